"""Live migration between two engines, engine side: staged KV copies while the source decodes,
pause, tail copy, attach on the destination; and the recompute and abort paths. Token ids after
migration equal an unmigrated run exactly (vLLM-style exact-id invariants)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine import migration
from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle, collect_steps, greedy, run_all

NUM_NEW = 24


def _config(**overrides) -> EngineConfig:
    base = dict(dtype="float32", num_threads=2, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                tokens_per_page=16, device_memory_bytes=1 << 30, host_buffer_bytes=16 << 20)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def engines(smollm2_tokenizer):
    source = LLMEngine(_config(), tokenizer=smollm2_tokenizer)
    destination = LLMEngine(_config(), tokenizer=smollm2_tokenizer)
    yield source, destination
    source.close()
    destination.close()


@pytest.fixture(scope="module")
def prompt(smollm2_tokenizer):
    return smollm2_tokenizer(PROMPTS[6]).input_ids


@pytest.fixture(scope="module")
def expected(engines, prompt):
    return run_all(engines[0], [prompt], greedy(NUM_NEW), prefix="ref")["ref0"]


@pytest.mark.parametrize("copy_kv", [True, False], ids=["copy", "recompute"])
def test_migrated_request_gives_the_same_tokens(engines, prompt, expected, copy_kv):
    source, destination = engines
    request_id = f"mig-{copy_kv}"
    tokens: dict[str, list[int]] = {}
    source.add_request(GenerateRequest(request_id, tuple(prompt), greedy(NUM_NEW)))
    collect_steps(source, tokens, steps=4)  # prefill + a few decodes
    stages = [migration.copy_kv(source, request_id, 0)]
    collect_steps(source, tokens, steps=3)  # it keeps decoding while the first stage is in flight
    stages.append(migration.copy_kv(source, request_id, stages[-1].end))
    snapshot = migration.pause(source, request_id)
    stages.append(migration.copy_kv(source, request_id, stages[-1].end))
    assert stages[-1].end == snapshot.num_computed_tokens == snapshot.num_tokens - 1
    assert migration.reserve(destination, request_id, snapshot.num_tokens)
    if copy_kv:
        for stage in stages:
            migration.write_kv(destination, request_id, stage)
    migration.attach(destination, snapshot, snapshot.num_computed_tokens if copy_kv else 0)
    migration.release(source, request_id)
    assert not source.has_work
    assert_pool_idle(source)
    collect_steps(destination, tokens)
    assert tokens[request_id] == expected
    assert_pool_idle(destination)


def test_a_held_request_waits_at_its_reservation_and_resumes(engines, prompt, expected):
    """`hold` caps a request at the tokens a destination reserved: the scheduler stops decoding it there
    (another request goes on), and `resume` (the roll-back) lifts the cap with the unheld run's tokens."""
    source = engines[0]
    tokens: dict[str, list[int]] = {}
    source.add_request(GenerateRequest("held", tuple(prompt), greedy(NUM_NEW)))
    collect_steps(source, tokens, steps=3)  # prefill + 2 decodes: 3 tokens out
    cap = len(prompt) + 6
    migration.hold(source, "held", cap)
    source.add_request(GenerateRequest("other", tuple(prompt), greedy(8)))
    collect_steps(source, tokens, steps=12)
    request = source.scheduler.requests["held"]
    assert request.num_tokens == cap and len(tokens["held"]) == 6  # waited at the cap ...
    assert tokens["other"] == expected[:8] and "other" not in source.scheduler.requests  # ... while "other" ran
    migration.resume(source, "held")
    collect_steps(source, tokens)
    assert tokens["held"] == expected
    assert_pool_idle(source)


def test_refused_migration_continues_on_the_source(engines, prompt, expected, smollm2_tokenizer):
    source, _ = engines
    full = LLMEngine(_config(max_num_seqs=1), tokenizer=smollm2_tokenizer)
    try:
        blocker = smollm2_tokenizer(PROMPTS[0]).input_ids
        full.add_request(GenerateRequest("blocker", tuple(blocker), greedy(200)))
        full.step()  # the only slot is taken
        tokens: dict[str, list[int]] = {}
        source.add_request(GenerateRequest("stay", tuple(prompt), greedy(NUM_NEW)))
        collect_steps(source, tokens, steps=4)
        snapshot = migration.pause(source, "stay")
        assert not migration.reserve(full, "stay", snapshot.num_tokens)  # destination refuses
        migration.cancel(full, "stay")
        migration.resume(source, "stay")
        collect_steps(source, tokens)
        assert tokens["stay"] == expected
        assert_pool_idle(source)
        full.abort("blocker")
        assert_pool_idle(full)
    finally:
        full.close()


def _run_text(engine: LLMEngine, request_id: str, prompt, params, migrate_to: LLMEngine | None = None):
    """Token ids and text of one request; with `migrate_to`, it moves there (KV copy) after 6 steps."""
    tokens: list[int] = []
    text = ""
    engine.add_request(GenerateRequest(request_id, tuple(prompt), params))
    current, steps = engine, 0
    while current.has_work:
        for output in current.step():
            tokens.extend(output.new_token_ids)
            text += output.text_delta
        steps += 1
        if migrate_to is not None and steps == 6 and request_id in current.scheduler.requests:
            snapshot = migration.pause(current, request_id)
            stage = migration.copy_kv(current, request_id, 0)
            assert migration.reserve(migrate_to, request_id, snapshot.num_tokens)
            migration.write_kv(migrate_to, request_id, stage)
            migration.attach(migrate_to, snapshot, snapshot.num_computed_tokens)
            migration.release(current, request_id)
            current = migrate_to
    return tokens, text


def test_seeded_sampling_and_stop_strings_survive_a_migration(engines, prompt):
    """The sampler's RNG, the penalties' counts and the stop-string state move with the request: a seeded,
    penalised sample with a stop string that first matches after the migration ends with the same tokens and
    text as the unmigrated run."""
    source, destination = engines
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=40,
                            frequency_penalty=0.3, ignore_eos=True)
    free_tokens, free_text = _run_text(source, "free", prompt, params)
    stop = free_text[len(free_text) * 2 // 3:][:4]  # a string first seen late in the output
    assert stop.strip() and free_text.index(stop) > len(free_text) // 3
    params = replace(params, stop=(stop,))
    reference = _run_text(source, "unmigrated", prompt, params)
    migrated = _run_text(source, "migrated", prompt, params, migrate_to=destination)
    assert migrated == reference
    assert reference[1] == free_text[:free_text.index(stop)]  # it really stopped at the string
    assert_pool_idle(source)
    assert_pool_idle(destination)


def test_request_loads_count_the_kv_each_request_grows_into(engines, prompt):
    """What a controller plans with: a request's KV now and at its last possible token (KunServe's drop plan
    sizes a spike by the latter: `ReplicaLoad.growth_chunks`)."""
    from deployments.telemetry import ReplicaStats, replica_load

    source, _ = engines
    source.add_request(GenerateRequest("grows", tuple(prompt), greedy(256 - len(prompt))))  # to max_model_len
    source.add_request(GenerateRequest("queued", tuple(prompt), greedy(40)))
    try:
        collect_steps(source, {}, steps=1)
        loads = {load.request_id: load for load in migration.request_loads(source)}
        for load in loads.values():
            assert load.peak_chunks == source.kv.chunks_to_grow(None, load.num_tokens + load.num_remaining)
            assert load.peak_chunks >= load.kv_chunks
        assert loads["grows"].num_tokens + loads["grows"].num_remaining == 256
        assert loads["grows"].peak_chunks > loads["grows"].kv_chunks  # 16-token pages: it has pages to grow into
        stats = ReplicaStats(kv_chunks_used=source.kv.num_used_chunks(),
                             kv_chunks_free=source.kv.num_available_chunks())
        report = replica_load("r", stats, loads.values(), 0.0)
        assert report.growth_chunks == sum(load.peak_chunks - load.kv_chunks for load in loads.values())
        assert report.demand_chunks == report.used_chunks + report.waiting_chunks  # migration ignores growth
    finally:
        for request_id in ("grows", "queued"):
            source.abort(request_id)
        collect_steps(source, {})
    assert_pool_idle(source)


def test_a_reservation_at_the_context_limit_stays_in_its_slot(engines):
    """The growth page a reservation adds stops at the slot's end: one past it was the next slot's first page, left
    mapped for a later request's grow to trip over ("page N is already mapped": a served engine loop died of it)."""
    from memory.kv.invariants import mapping_violations

    _, destination = engines
    limit = destination.max_model_len
    assert migration.reserve(destination, "edge", limit)
    assert migration.reserve(destination, "next", 8)  # the slot after it: its first page is free to map
    assert not mapping_violations(destination.kv)
    assert len(destination.kv.requests["edge"].blocks[0]) == destination.kv_spec.pages_per_slot
    assert not migration.reserve(destination, "too-long", limit + 1)
    with pytest.raises(ValueError, match="exceed the slot length"):
        destination.kv.reserve_import("too-long", destination.kv_spec.max_len + 1)
    for request_id in ("edge", "next"):
        migration.cancel(destination, request_id)
    assert_pool_idle(destination)
