"""KunServe at the engine level: dropping layers frees weights for KV with exact pool accounting; two
engines that dropped complementary layers serve as a two-stage pipeline; greedy tokens equal
transformers' (fp32) for requests that start before a drop, run wholly while dropped, and span a restore."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist

from engine.api import GenerateRequest, LayersDroppedError
from engine.config import EngineConfig
from engine.cooperative.carry import CarryPolicy
from engine.cooperative.pair import CooperativePair, PairState
from engine.cooperative.transport import ProcessGroupTransport
from engine.core.engine import LLMEngine
from tests.engine.engine_helpers import assert_pool_idle, greedy
from tests.engine.reference import hf_greedy, hf_model_from_source

NUM_NEW = 10


def config(model_dir, **overrides) -> EngineConfig:
    base = dict(model=str(model_dir), dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=8,
                max_num_batched_tokens=32, tokens_per_page=16, device_memory_bytes=64 << 20,
                host_buffer_bytes=4 << 20, enable_parameter_dropping=True)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_dir, prompts):
    return hf_greedy(hf_model_from_source(str(tiny_qwen3_dir)), prompts, NUM_NEW)


@pytest.fixture
def pair(tiny_qwen3_dir, smollm2_tokenizer):
    first = LLMEngine(config(tiny_qwen3_dir), tokenizer=smollm2_tokenizer)
    second = LLMEngine(config(tiny_qwen3_dir), tokenizer=smollm2_tokenizer)
    # micro-batches from 8 tokens up: the tiny test prompts' prefill steps are cut in two
    yield CooperativePair(first, second, carry=CarryPolicy("recompute"), min_micro_batch_tokens=8)
    first.close()
    second.close()


def add(pair_or_engine, request_id, prompt, home=None):
    request = GenerateRequest(request_id, tuple(prompt), greedy(NUM_NEW))
    if home is None:
        pair_or_engine.add_request(request)
    else:
        pair_or_engine.add_request(request, home)


def assert_pool_exact(engine: LLMEngine) -> None:
    """Every chunk accounted for, within the budget, and the weights balloon is the layers it holds."""
    telemetry = engine.pool.telemetry()
    assert sum(telemetry.chunks_per_client.values()) + telemetry.num_free_chunks == telemetry.num_chunks
    assert telemetry.num_alive_chunks <= telemetry.num_chunks
    arena = engine.rank.arena
    kept = [layer for layer in arena.layers if layer not in arena.dropped_layers]
    assert telemetry.chunks_per_client["weights"] == arena.layer_chunks(kept) + arena.segments[None].num_mapped


def test_drop_gives_weights_to_kv_and_restore_continues_exactly(pair, prompts, reference):
    engine = pair.first
    add(engine, "a", prompts[2])
    tokens: list[int] = []
    for _ in range(4):
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    weights_before = engine.pool.num_held("weights")
    available_before = engine.kv.num_available_chunks()
    layer_chunks = engine.rank.arena.layer_chunks([2, 3])
    assert engine.drop_layers(range(2, 4)) == layer_chunks > 0
    assert engine.pool.num_held("weights") == weights_before - layer_chunks
    assert engine.kv.num_available_chunks() == available_before + layer_chunks  # KV may take them now
    assert engine.dropped_weight_bytes == layer_chunks * engine.pool.chunk_bytes
    assert_pool_exact(engine)
    computed = engine.scheduler.requests["a"].num_computed_tokens
    with pytest.raises(LayersDroppedError, match=r"\[2, 3\]"):
        engine.step()
    assert engine.scheduler.requests["a"].num_computed_tokens == computed  # a refused step changed nothing
    assert engine.restore_layers(range(0, 4)) == layer_chunks
    assert engine.pool.num_held("weights") == weights_before
    while engine.has_work:
        tokens += [t for out in engine.step() for t in out.new_token_ids]
    assert tokens == reference[2]
    assert_pool_idle(engine)


def run_pair(pair: CooperativePair, tokens: dict[str, list[int]], steps: int | None = None,
             finished: dict[str, str] | None = None) -> None:
    count = 0
    while pair.has_work and (steps is None or count < steps):
        for item in pair.step():
            tokens.setdefault(item.output.request_id, []).extend(item.output.new_token_ids)
            if finished is not None and item.output.is_finished:
                finished[item.output.request_id] = "first" if item.home is pair.first else "second"
        for engine in (pair.first, pair.second):
            assert_pool_exact(engine)
        count += 1


@pytest.mark.parametrize("carry", ["copy", "recompute"])
def test_pipeline_serves_both_replicas_requests_exactly(pair, prompts, reference, carry):
    pair.carry = CarryPolicy(carry)
    first, second = pair.first, pair.second
    tokens: dict[str, list[int]] = {}
    homes: dict[str, str] = {}
    add(pair, "before-first", prompts[2], first)
    add(pair, "before-second", prompts[6], second)
    run_pair(pair, tokens, steps=4)  # both mid-prefill or decoding
    free_before = [engine.pool.num_free() for engine in (first, second)]
    freed = pair.drop(first_keeps=2, second_from=2)
    assert (pair.num_carried, pair.num_recomputed) == ((2, 0) if carry == "copy" else (0, 2))
    assert pair.state is PairState.DROPPED and pair.split == 2
    assert [engine.stats().drop_state for engine in (first, second)] == ["dropped", "dropped"]
    assert second.stats().dropped_weight_bytes == second.rank.arena.layer_chunks([0, 1]) * second.pool.chunk_bytes
    assert freed == first.rank.arena.layer_chunks([2, 3]) + second.rank.arena.layer_chunks([0, 1])
    assert first.model.dropped_layers == {2, 3} and second.model.dropped_layers == {0, 1}
    assert sum(engine.pool.num_free() for engine in (first, second)) >= sum(free_before) + freed
    assert first.kv.held_layers == {0, 1} and second.kv.held_layers == {2, 3}
    add(pair, "while-first", prompts[0], first)
    add(pair, "while-second", prompts[3], second)
    run_pair(pair, tokens, steps=3, finished=homes)
    add(pair, "spans-restore", prompts[4], second)
    run_pair(pair, tokens, steps=2, finished=homes)
    while "while-first" not in homes or "while-second" not in homes:
        run_pair(pair, tokens, steps=1, finished=homes)  # these two run wholly on the pipeline
    assert pair._runner.stats.num_micro_batches > pair._runner.stats.num_steps  # micro-batches overlapped
    running = len(first.scheduler.running)
    assert running > 0
    assert pair.restore() == freed
    assert (pair.num_carried, pair.num_recomputed) == ((2 + running, 0) if carry == "copy" else (0, 2 + running))
    assert pair.state is PairState.NORMAL and not first.model.dropped_layers and not second.model.dropped_layers
    run_pair(pair, tokens, finished=homes)
    expected = {"before-first": 2, "before-second": 6, "while-first": 0, "while-second": 3, "spans-restore": 4}
    assert {rid: tokens[rid] for rid in expected} == {rid: reference[i] for rid, i in expected.items()}
    assert homes == {"before-first": "first", "before-second": "second", "while-first": "first",
                     "while-second": "second", "spans-restore": "second"}
    assert 0.0 <= pair.bubble_ratio < 1.0 and pair.stats.num_steps > 0
    assert first.stats().pipeline_bubble_ratio == second.stats().pipeline_bubble_ratio > 0
    assert [engine.stats().drop_state for engine in (first, second)] == ["normal", "normal"]
    assert first.stats().dropped_weight_bytes == 0
    assert_pool_idle(first)
    assert_pool_idle(second)


def test_partial_drop_keeps_the_overlap_on_both_and_grows_exactly(pair, prompts, reference):
    freed = pair.drop(first_keeps=3, second_from=1)  # layers 1 and 2 stay on both; only 0 and 3 go
    assert freed == pair.first.rank.arena.layer_chunks([3]) + pair.second.rank.arena.layer_chunks([0])
    assert pair.split == 2
    tokens: dict[str, list[int]] = {}
    add(pair, "x", prompts[1], pair.second)
    add(pair, "y", prompts[5], pair.first)
    run_pair(pair, tokens, steps=3)
    # the plan's grow while the pair stays under pressure: the overlap goes too, the cut stays, no KV moves
    with pytest.raises(ValueError, match="cut"):
        pair.grow(first_keeps=1, second_from=1)
    with pytest.raises(ValueError, match="restore"):
        pair.grow(first_keeps=4, second_from=1)
    available = [engine.kv.num_available_chunks() for engine in (pair.first, pair.second)]
    grown = pair.grow(first_keeps=2, second_from=2)
    assert grown == pair.first.rank.arena.layer_chunks([2]) + pair.second.rank.arena.layer_chunks([1])
    assert pair.first.model.dropped_layers == {2, 3} and pair.second.model.dropped_layers == {0, 1}
    assert [engine.kv.num_available_chunks() for engine in (pair.first, pair.second)] == [
        available[0] + pair.first.rank.arena.layer_chunks([2]), available[1] + pair.second.rank.arena.layer_chunks([1])]
    for engine in (pair.first, pair.second):
        assert_pool_exact(engine)
    add(pair, "z", prompts[7], pair.second)  # wholly on the grown pipeline
    run_pair(pair, tokens, steps=4)
    assert pair.restore() == freed + grown
    run_pair(pair, tokens)  # x and y span the grow and the restore
    assert [tokens[rid] for rid in ("x", "y", "z")] == [reference[1], reference[5], reference[7]]


def test_choices_of_one_prompt_run_as_separate_requests_while_dropped(pair, prompts, reference):
    """n > 1 on the pipeline: the pipeline runner samples one row per request, so the choices do not fork the
    prompt's KV there: each prefills it as an ordinary request, and every choice gives transformers' tokens."""
    pair.drop(first_keeps=2, second_from=2)
    prefilled: list[int] = []
    pair.first.scheduler.plan_observers.append(
        lambda plan: prefilled.append(sum(len(chunk.token_ids) for chunk in plan.prefills)))
    for index in range(3):
        pair.add_request(GenerateRequest(f"choice{index}", tuple(prompts[6]), greedy(NUM_NEW), prompt_group="g"),
                         pair.second)
    tokens: dict[str, list[int]] = {}
    run_pair(pair, tokens)
    assert sum(prefilled) == 3 * len(prompts[6])
    assert tokens == {f"choice{index}": reference[6] for index in range(3)}
    pair.restore()
    for engine in (pair.first, pair.second):
        assert_pool_idle(engine)


def test_peer_lost_while_dropped(pair, prompts, reference):
    first, second = pair.first, pair.second
    tokens: dict[str, list[int]] = {}
    add(pair, "mine", prompts[2], first)
    add(pair, "theirs", prompts[5], second)
    pair.drop(first_keeps=2, second_from=2)
    run_pair(pair, tokens, steps=3)
    ended = pair.peer_lost(second)
    assert [(out.request_id, out.finish_reason) for out in ended] == [("theirs", "error")]
    assert "failed" in ended[0].error
    assert not first.model.dropped_layers and first.kv.held_layers == {0, 1, 2, 3}
    while first.has_work:
        tokens["mine"] += [t for out in first.step() for t in out.new_token_ids]
    assert tokens["mine"] == reference[2]
    assert_pool_idle(first)


def test_hidden_states_over_a_gloo_process_group(pair, prompts, reference):
    store = dist.HashStore()
    groups: list = [None, None]

    def join(rank: int) -> None:
        groups[rank] = dist.ProcessGroupGloo(store, rank, 2)

    threads = [threading.Thread(target=join, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    pair.drop(first_keeps=2, second_from=2, transport=ProcessGroupTransport(groups[0], groups[1]))
    tokens: dict[str, list[int]] = {}
    add(pair, "g0", prompts[6], pair.first)
    add(pair, "g1", prompts[0], pair.second)
    run_pair(pair, tokens)
    assert [tokens["g0"], tokens["g1"]] == [reference[6], reference[0]]
    pair.restore()


def test_step_cut_into_micro_batches():
    from engine.cooperative.pipeline import split_micro_batches
    from engine.core.scheduler import ScheduledChunk, SchedulerOutput

    decodes = tuple(ScheduledChunk(f"d{i}", i, 5, (7,), True) for i in range(3))
    prefill = ScheduledChunk("p", 3, 0, tuple(range(9)), True)
    pieces = split_micro_batches(SchedulerOutput(decodes, (prefill,), (), 0), 2)
    assert [(len(p.decodes), [(c.start, len(c.token_ids), c.samples) for c in p.prefills]) for p in pieces] == [
        (3, [(0, 3, False)]), (0, [(3, 6, True)])]
    assert sum(piece.num_tokens for piece in pieces) == 12


def test_decode_steps_cut_by_rows_exactly():
    from engine.cooperative.pipeline import MicroBatchCut
    from engine.core.scheduler import ScheduledChunk, SchedulerOutput

    def decodes(n):
        return tuple(ScheduledChunk(f"d{i}", i, 5, (7,), True) for i in range(n))

    default, cut = MicroBatchCut(), MicroBatchCut(min_decode_rows=2)
    assert [default.count(n, n) for n in (1, 5, 127, 128, 1000)] == [1, 1, 1, 2, 2]  # decode steps run whole
    assert [cut.count(n, n) for n in (1, 2, 3, 4, 5, 127)] == [1, 1, 1, 2, 2, 2]  # two of >= 2 rows
    assert MicroBatchCut(4, 64, 2).count(7, 7) == 3 and MicroBatchCut(4, 64, 2).count(9, 9) == 4
    pieces = cut.cut(SchedulerOutput(decodes(5), (), (), 0))
    assert [[c.request_id for c in p.decodes] for p in pieces] == [["d0", "d1", "d2"], ["d3", "d4"]]
    assert [len(p.decodes) for p in default.cut(SchedulerOutput(decodes(5), (), (), 0))] == [5]
    for n in range(0, 40):  # the simulator's decode-only pieces are the engine's cut
        assert cut.decode_rows(n) == [len(p.decodes) for p in cut.cut(SchedulerOutput(decodes(n), (), (), 0))
                                      if p.decodes]
    # a mixed step: cut by its 4 decode rows into 2 of 7 tokens; the prefill's first part does not sample
    prefill = ScheduledChunk("p", 9, 0, tuple(range(10)), True)
    pieces = cut.cut(SchedulerOutput(decodes(4), (prefill,), (), 0))
    assert [(len(p.decodes), [(c.start, len(c.token_ids), c.samples) for c in p.prefills]) for p in pieces] == [
        (4, [(0, 3, False)]), (0, [(3, 7, True)])]


def test_pipeline_with_decode_steps_cut_equals_transformers(tiny_qwen3_dir, smollm2_tokenizer, prompts, reference):
    first = LLMEngine(config(tiny_qwen3_dir), tokenizer=smollm2_tokenizer)
    second = LLMEngine(config(tiny_qwen3_dir), tokenizer=smollm2_tokenizer)
    # prefill steps (<= 32 tokens) run whole; decode steps of 2+ rows are cut in two of >= 1 row
    pair = CooperativePair(first, second, carry=CarryPolicy("copy"), min_decode_rows=1)
    try:
        pair.drop(first_keeps=2, second_from=2)
        for index, home in ((0, first), (3, second), (6, first)):
            add(pair, f"r{index}", prompts[index], home)
        tokens: dict[str, list[int]] = {}
        run_pair(pair, tokens)
        assert {rid: tokens[rid] for rid in ("r0", "r3", "r6")} == {f"r{i}": reference[i] for i in (0, 3, 6)}
        stats = pair._runner.stats
        assert stats.num_micro_batches >= stats.num_steps + NUM_NEW - 2  # the shared decode steps ran as two
        pair.restore()
    finally:
        first.close()
        second.close()


def test_no_drop_while_a_request_is_being_migrated(pair, prompts, reference):
    from engine import migration

    tokens: dict[str, list[int]] = {}
    add(pair, "m", prompts[2], pair.first)
    run_pair(pair, tokens, steps=3)
    migration.pause(pair.first, "m")
    with pytest.raises(RuntimeError, match="migrated"):
        pair.drop(first_keeps=2, second_from=2)
    assert pair.state is PairState.NORMAL and not pair.first.model.dropped_layers
    assert pair.first.stats().drop_state == "normal"
    migration.resume(pair.first, "m")
    run_pair(pair, tokens)
    assert tokens["m"] == reference[2]


def test_the_paged_layout_holds_only_its_layers_and_the_pipeline_stays_exact(tiny_qwen3_dir, smollm2_tokenizer,
                                                                              prompts, reference):
    """`hold_layers` on the paged layout (Jenga's small pages): each stage's blocks take pages of its layers
    only, the pair carries KV by copy across the drop and the restore, the pool stays exact, tokens equal
    transformers'."""
    first, second = (LLMEngine(config(tiny_qwen3_dir, kv_layout="paged"), tokenizer=smollm2_tokenizer)
                     for _ in range(2))
    pair = CooperativePair(first, second, carry=CarryPolicy("copy"), min_micro_batch_tokens=8)
    tokens: dict[str, list[int]] = {}
    add(pair, "before-first", prompts[2], first)
    add(pair, "before-second", prompts[6], second)
    run_pair(pair, tokens, steps=4)
    full = first.kv.chunks_to_grow(None, 64)
    pair.drop(first_keeps=2, second_from=2)
    assert (pair.num_carried, pair.num_recomputed) == (2, 0)
    assert first.kv.held_layers == {0, 1} and second.kv.held_layers == {2, 3}
    assert first.kv.chunks_to_grow(None, 64) < full  # a block takes pages of 2 layers of 4, not all
    for engine in (first, second):
        assert_pool_exact(engine)
    add(pair, "while-first", prompts[0], first)
    run_pair(pair, tokens, steps=6)
    running = len(first.scheduler.running)
    assert running > 0
    pair.restore()
    assert (pair.num_carried, pair.num_recomputed) == (2 + running, 0)
    assert first.kv.held_layers == second.kv.held_layers == {0, 1, 2, 3}
    run_pair(pair, tokens)
    expected = {"before-first": 2, "before-second": 6, "while-first": 0}
    assert {rid: tokens[rid] for rid in expected} == {rid: reference[i] for rid, i in expected.items()}
    for engine in (first, second):
        assert_pool_idle(engine)
        engine.close()
