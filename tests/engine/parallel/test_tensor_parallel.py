"""Tensor parallelism without Ray: rank 1 in a spawned process, rank 0 in the test.

Greedy tokens with TP=2 equal TP=1's (fp32), with chunked prefill and with swap preemption, which
exercises the KV layout log that keeps rank 1's pool and pages identical to rank 0's; and requests migrated
mid-generation from a TP=2 engine to a TP=1 one and back (KV stages hold every head: the TP=2 source gathers
its ranks' shares, the TP=2 destination scatters them) give the unmigrated run's tokens.
"""

from __future__ import annotations

import contextlib
import multiprocessing

import pytest
import torch

from engine import migration
from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.device.rank import measure_weight_bytes
from engine.model.llama import LlamaModel, ShardPlan
from engine.parallel.executor import create_executor
from engine.parallel.worker import WorkerProcess
from tests.engine.engine_helpers import PROMPTS, ScriptedOffload, assert_pool_idle, collect_steps, greedy, run_all
from tests.engine.reference import hf_greedy

NUM_NEW = 10
NUM_NEW_LONG = 40


def _config(tensor_parallel_size: int, **overrides) -> EngineConfig:
    base = dict(dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=8, max_num_batched_tokens=16,
                tokens_per_page=16, device_memory_bytes=1 << 30, host_buffer_bytes=64 << 20,
                tensor_parallel_size=tensor_parallel_size)
    base.update(overrides)
    return EngineConfig(**base)


def _worker_main(init_file: str, config: EngineConfig, result) -> None:
    result.put(WorkerProcess(1, 2, init_file, config).run())


@contextlib.contextmanager
def _tp2_engine(tmp_path, config: EngineConfig, tokenizer):
    """Rank 0 here, rank 1 in a spawned process; on exit, checks that the worker ran steps and stopped."""
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    init_file = str(tmp_path / "rendezvous")
    worker = context.Process(target=_worker_main, args=(init_file, config, result), daemon=True)
    worker.start()
    engine = LLMEngine(config, tokenizer=tokenizer, executor=create_executor(config, init_file))
    try:
        yield engine
    finally:
        engine.close()  # broadcasts stop
    worker.join(timeout=60)
    assert worker.exitcode == 0
    assert result.get(timeout=5) > 0  # the worker really ran steps


def _run_tp2(tmp_path, config: EngineConfig, prompts, tokenizer, num_new: int = 10):
    with _tp2_engine(tmp_path, config, tokenizer) as engine:
        outputs = run_all(engine, prompts, greedy(num_new))
        stats = (engine.scheduler.num_preemptions, engine.scheduler.num_swaps)
        assert_pool_idle(engine)
        ranks = engine.memory_telemetry()  # gathered from both ranks
        assert len(ranks) == 2 and ranks[1]["chunk_bytes"] * 2 == ranks[0]["chunk_bytes"]  # 1 vs 2 kv heads
        assert ranks[1]["chunks_per_client"]["kv"] == ranks[0]["chunks_per_client"]["kv"]  # the same cached pages
    return outputs, stats


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [smollm2_tokenizer(text).input_ids for text in PROMPTS[:6]]


def _tp1(prompts, tokenizer, num_new: int):
    engine = LLMEngine(_config(1, num_threads=2), tokenizer=tokenizer)
    try:
        return run_all(engine, prompts, greedy(num_new))
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tp1_tokens(prompts, smollm2_tokenizer):
    return _tp1(prompts, smollm2_tokenizer, NUM_NEW)


def test_tp2_greedy_equals_tp1(tmp_path, prompts, tp1_tokens, smollm2_tokenizer):
    # SmolLM2 has 3 key/value heads: rank 0 gets 2 and rank 1 gets 1 (uneven split)
    ours, _ = _run_tp2(tmp_path, _config(2), prompts, smollm2_tokenizer)
    assert ours == tp1_tokens


@pytest.mark.slow
def test_tp2_with_swap_preemption_equals_tp1(tmp_path, prompts, smollm2_tokenizer, smollm2_fp32):
    model_config, weights = smollm2_fp32
    shard = ShardPlan.for_rank(model_config, 0, 2)  # rank 0 holds 2 of the 3 key/value heads
    weight_bytes = measure_weight_bytes(
        lambda allocate: LlamaModel(model_config, weights, None, torch.float32, allocate=allocate, shard=shard))
    config = _config(2, enable_prefix_caching=False, preemption_mode="swap")
    workspace = LlamaModel.plan_buffers(model_config, shard, torch.float32,
                                        config.max_num_batched_tokens + config.max_num_seqs, config.max_num_seqs)
    kv_per_token = 2 * model_config.num_layers * len(shard.kv_heads) * model_config.head_dim * 4
    budget = weight_bytes + workspace.num_bytes + 160 * kv_per_token  # 6 requests grow by 40 tokens each
    config = _config(2, device_memory_bytes=budget, enable_prefix_caching=False, preemption_mode="swap")
    reference = _tp1(prompts, smollm2_tokenizer, NUM_NEW_LONG)
    ours, (num_preemptions, num_swaps) = _run_tp2(tmp_path, config, prompts, smollm2_tokenizer, NUM_NEW_LONG)
    assert num_preemptions > 0 and num_swaps > 0
    assert ours == reference


def _migrate(source: LLMEngine, destination: LLMEngine, request_id: str, tokens: dict[str, list[int]]) -> None:
    """A staged copy while the source decodes, then pause + tail, reserve, write, attach, release."""
    stages = [migration.copy_kv(source, request_id, 0)]
    assert stages[0].layers[0][0].shape[1] == 3  # every KV head, from any TP size
    collect_steps(source, tokens, steps=2)
    snapshot, tail = migration.pause_and_copy_tail(source, request_id, stages[-1].end)
    assert migration.reserve(destination, request_id, snapshot.num_tokens)
    for stage in [*stages, tail]:
        migration.write_kv(destination, request_id, stage)
    migration.attach(destination, snapshot, snapshot.num_computed_tokens)
    migration.release(source, request_id)


@pytest.mark.slow  # 30 s; TP=2 stays in the default suite (test_tp2_greedy_equals_tp1)
def test_requests_migrate_between_tp2_and_tp1(tmp_path, prompts, smollm2_tokenizer):
    prompt = prompts[2]
    tp1 = LLMEngine(_config(1), tokenizer=smollm2_tokenizer)
    try:
        expected = run_all(tp1, [prompt], greedy(NUM_NEW_LONG))["r0"]
        with _tp2_engine(tmp_path, _config(2), smollm2_tokenizer) as tp2:
            tokens: dict[str, list[int]] = {}
            tp2.add_request(GenerateRequest("out", tuple(prompt), greedy(NUM_NEW_LONG)))
            tp1.add_request(GenerateRequest("in", tuple(prompt), greedy(NUM_NEW_LONG)))
            collect_steps(tp2, tokens, steps=5)
            collect_steps(tp1, tokens, steps=5)
            _migrate(tp2, tp1, "out", tokens)  # TP=2 -> TP=1: gathered from both ranks
            _migrate(tp1, tp2, "in", tokens)  # TP=1 -> TP=2: scattered to both ranks
            collect_steps(tp1, tokens)
            collect_steps(tp2, tokens)
            assert tokens["out"] == expected and tokens["in"] == expected
            assert_pool_idle(tp2)
        assert_pool_idle(tp1)
    finally:
        tp1.close()


# per request of the module's prompts: the layers admitted on the host (the scripted policy of the layer-wise tests)
OFFLOADED = {"r0": (), "r1": tuple(range(15, 30)), "r2": tuple(range(1, 30)), "r3": tuple(range(29)),
             "r4": tuple(range(0, 30, 2)), "r5": (0, 29)}


def _same_pages_on_every_rank(engine: LLMEngine) -> None:
    """Rank 1 (one of the three KV heads: pages half rank 0's bytes) holds the same pages on the same tier."""
    ranks = engine.memory_telemetry()
    assert ranks[1]["chunks_per_client"]["kv"] == ranks[0]["chunks_per_client"]["kv"]
    assert ranks[1]["host_buffer_used_bytes"] * 2 == ranks[0]["host_buffer_used_bytes"]


@pytest.mark.slow  # a TP=2 engine and transformers' reference (~1 min of CPU each): `make test-all`
@pytest.mark.parametrize("staging", ["copy", "in_place"])
def test_tp2_layerwise_with_offloaded_layers_gives_transformers_tokens(tmp_path, prompts, smollm2_tokenizer,
                                                                        hf_smollm2, staging):
    """Rank 0's layout log carries the host pages' slots, each block's chunk kinds, layers demoted and promoted
    during decode and every step's staging plan; rank 1 keeps its heads of the same pages on the same tier and
    stages them the same way, so the tokens are transformers'. A request leaving with layers on the host reads
    them from both ranks' host buffers (migrated to a TP=1 engine); coming back with layers imported onto the
    host, both ranks write their heads of those layers into their host buffers."""
    reference = hf_greedy(hf_smollm2, prompts, NUM_NEW_LONG)
    config = _config(2, kv_offload="layerwise", kv_staging=staging)
    with _tp2_engine(tmp_path, config, smollm2_tokenizer) as engine:
        engine.scheduler.offload = ScriptedOffload(engine.kv, engine.scheduler.slo, OFFLOADED)
        tokens: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):  # r1 runs long enough to be migrated late
            num_new = NUM_NEW_LONG if index == 1 else NUM_NEW
            engine.add_request(GenerateRequest(f"r{index}", tuple(prompt), greedy(num_new)))
        while not all(len(tokens.get(f"r{index}", [])) >= 2 for index in range(len(prompts))):
            collect_steps(engine, tokens, steps=1)
        assert engine.kv.offloaded_layers("r2") == OFFLOADED["r2"]
        _same_pages_on_every_rank(engine)
        freed = sum(engine.kv.demote("r0", layer) for layer in range(20, 30))
        assert freed > 0
        collect_steps(engine, tokens, steps=2)  # r0 decodes with layers 20-29 on the host
        _same_pages_on_every_rank(engine)
        assert engine.kv.promote("r1", 29) and engine.kv.promote("r0", 25)
        assert engine.kv.layer_chunk_counts("r0")[25][1] == 0
        collect_steps(engine, tokens, steps=1)
        _same_pages_on_every_rank(engine)
        tp1 = LLMEngine(_config(1), tokenizer=smollm2_tokenizer)
        try:
            _migrate(engine, tp1, "r1", tokens)  # layers 15-28 still on both ranks' hosts
            collect_steps(tp1, tokens, steps=2)
            engine.scheduler.offload.imported_layers = tuple(range(10, 30))
            _migrate(tp1, engine, "r1", tokens)  # and back, imported with layers 10-29 onto both ranks' hosts
            assert engine.kv.offloaded_layers("r1") == tuple(range(10, 30))
            _same_pages_on_every_rank(engine)
            assert_pool_idle(tp1)
        finally:
            tp1.close()
        collect_steps(engine, tokens)
        for index, expected in enumerate(reference):
            assert tokens[f"r{index}"] == expected[: NUM_NEW_LONG if index == 1 else NUM_NEW], index
        assert_pool_idle(engine)
        _same_pages_on_every_rank(engine)
        assert engine.kv.host_buffer.used_bytes == 0
