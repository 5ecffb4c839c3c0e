"""Adaptive prefill chunks (eLLM): the policy's choices, and an engine that uses them keeps the pool within
budget, never runs a step without its workspace, finishes when KV holds everything, and matches transformers."""

from __future__ import annotations

import pytest

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.chunk_policy import AdaptiveChunkPolicy, FixedChunkPolicy, StepMemory, create_chunk_policy
from engine.core.engine import LLMEngine
from engine.core.sampling_workspace import SampledRows, peak_rows, sampling_plan
from engine.device.activation_workspace import ACTIVATIONS_CLIENT
from tests.engine.engine_helpers import assert_pool_idle, greedy
from tests.engine.reference import hf_greedy

NUM_NEW = 12
FLOOR, CEILING = 16, 128


# ---- the policy alone (fakes: one chunk per 8 activation tokens, one KV chunk per 4 tokens) ------------
def policy(activation_cost=lambda tokens, sampled: tokens // 8 + sampled.num_rows) -> AdaptiveChunkPolicy:
    return AdaptiveChunkPolicy(FLOOR, CEILING, activation_cost, lambda tokens: -(-tokens // 4))


def memory(available_chunks: int, next_kv_chunks: int, num_running: int) -> StepMemory:
    return StepMemory(available_chunks, next_kv_chunks, num_running, SampledRows.plain(num_running + 1))


def test_candidates_double_from_the_floor_to_the_ceiling():
    assert policy().candidates == (128, 64, 32)
    assert AdaptiveChunkPolicy(16, 100, lambda t, s: 0, lambda t: 0).candidates == (100, 64, 32)


def test_largest_budget_that_fits_is_chosen():
    p = policy()
    # 128 tokens, 2 running: activations 16 + 3, KV next 2, prefill KV of 126 tokens 32 -> 53 chunks
    assert p.token_budget(memory(available_chunks=53, next_kv_chunks=2, num_running=2)) == 128
    assert p.token_budget(memory(available_chunks=52, next_kv_chunks=2, num_running=2)) == 64
    # 32 tokens: 4 + 3 + 2 + 8 = 17
    assert p.token_budget(memory(available_chunks=17, next_kv_chunks=2, num_running=2)) == 32
    assert p.token_budget(memory(available_chunks=16, next_kv_chunks=2, num_running=2)) == FLOOR
    assert p.chosen == {128: 1, 64: 1, 32: 1, FLOOR: 1}


def test_kv_holding_everything_falls_back_to_the_floor():
    assert policy().token_budget(memory(available_chunks=0, next_kv_chunks=5, num_running=9)) == FLOOR


def test_static_split_workspace_costs_kv_nothing_so_the_ceiling_is_chosen():
    # under a static split the reserved share pays for the workspace (pages_charged_to_kv returns 0)
    p = policy(activation_cost=lambda tokens, sampled: 0)
    assert p.token_budget(memory(available_chunks=32, next_kv_chunks=0, num_running=0)) == CEILING


def test_no_ceiling_above_the_floor_means_a_fixed_budget():
    fixed = create_chunk_policy(512, None, lambda t, s: 0, lambda t: 0)
    assert isinstance(fixed, FixedChunkPolicy)
    assert fixed.token_budget(memory(0, 0, 0)) == 512
    assert isinstance(create_chunk_policy(512, 512, lambda t, s: 0, lambda t: 0), FixedChunkPolicy)
    with pytest.raises(ValueError):
        AdaptiveChunkPolicy(64, 32, lambda t, s: 0, lambda t: 0)


# ---- the engine with adaptive chunks -------------------------------------------------------------------
def engine_config(**overrides) -> EngineConfig:
    base = dict(dtype="float32", num_threads=2, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=FLOOR,
                max_prefill_chunk_tokens=CEILING, tokens_per_page=16, device_memory_bytes=1 << 30,
                host_buffer_bytes=64 << 20, enable_prefix_caching=False)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def reference(prompts, hf_smollm2):
    return hf_greedy(hf_smollm2, prompts, NUM_NEW)


def checked_steps(engine: LLMEngine, tokens: dict[str, list[int]], steps: int | None) -> None:
    """Runs `steps` steps (None: to the end), checking before each step that its workspace is obtainable and
    after each step that the pool is within budget; adds each request's new tokens to `tokens`."""
    pool, runner = engine.pool, engine.runner
    for count in range(10_000):
        if not engine.has_work or (steps is not None and count >= steps):
            break
        plan = engine.scheduler.schedule()
        if plan.is_empty:
            continue
        need = runner.activation_chunks(plan.num_tokens, plan.sampled_rows)
        assert need <= engine.workspace.num_mapped + pool.num_obtainable(ACTIVATIONS_CLIENT)
        for output in engine.update(plan, runner.run(plan, engine._sampling_states(plan))):
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        telemetry = pool.telemetry()
        assert sum(telemetry.chunks_per_client.values()) <= telemetry.num_chunks
        assert telemetry.num_alive_chunks <= telemetry.num_chunks
    if steps is None:
        assert not engine.has_work


def checked_run(engine: LLMEngine, prompts) -> dict[str, list[int]]:
    """Runs every prompt to the end with the checks of `checked_steps`."""
    tokens: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerateRequest(f"r{index}", tuple(prompt), greedy(NUM_NEW)))
        tokens[f"r{index}"] = []
    checked_steps(engine, tokens, None)
    assert engine.pool.telemetry().num_exhausted == 0
    return tokens


def test_adaptive_chunks_under_kv_pressure_match_transformers(smollm2_tokenizer, prompts, reference):
    probe = LLMEngine(engine_config(), tokenizer=smollm2_tokenizer)
    weights = probe.pool.num_held("weights") * probe.pool.chunk_bytes
    # the ceiling's model buffers (these greedy rows leave the sampler's peak, also in the figure, unused)
    workspace = probe.peak_activation_bytes - sampling_plan(peak_rows(16), probe.model_config.vocab_size).num_bytes
    kv_per_token = probe.kv_spec.bytes_per_token * 2 * probe.kv_spec.num_layers
    probe.close()
    # room for the ceiling's workspace plus ~64 tokens of KV while the 8 requests need ~210: the chunk
    # swells while KV is empty, shrinks to the floor as it fills, and requests are preempted
    engine = LLMEngine(engine_config(device_memory_bytes=weights + workspace + 64 * kv_per_token),
                       tokenizer=smollm2_tokenizer)
    try:
        ours = checked_run(engine, prompts)
        chosen = engine.scheduler.chunk_policy.chosen
        assert chosen[FLOOR] > 0 and max(chosen) > FLOOR  # both large and fallback chunks were used
        assert engine.scheduler.num_preemptions > 0
        for index, expected in enumerate(reference):
            assert ours[f"r{index}"] == expected, f"prompt {index}"
        assert_pool_idle(engine)
    finally:
        engine.close()


def test_static_split_reserves_the_ceiling_and_uses_it_while_kv_has_room(smollm2_tokenizer, prompts, reference):
    engine = LLMEngine(engine_config(pool_policy="static"), tokenizer=smollm2_tokenizer)
    try:
        plan = type(engine.model).plan_buffers(engine.model_config, engine.model.shard, engine.dtype, CEILING + 16, 16)
        sampler = sampling_plan(peak_rows(16), engine.model_config.vocab_size)  # the sampler's peak too
        reserved = plan.num_bytes + sampler.num_bytes
        assert engine.pool.policy.shares[ACTIVATIONS_CLIENT] == -(-reserved // engine.pool.chunk_bytes)
        ours = checked_run(engine, prompts[:4])  # four prompts are enough here (time): KV has room throughout
        assert set(engine.scheduler.chunk_policy.chosen) == {CEILING}
        for index, expected in enumerate(reference[:4]):
            assert ours[f"r{index}"] == expected, f"prompt {index}"
    finally:
        engine.close()
