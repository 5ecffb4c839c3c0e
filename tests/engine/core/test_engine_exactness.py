"""Greedy tokens equal transformers' on every path: batching, chunked prefill, swap, recompute,
prefix caching, sliding windows (the project's correctness bar)."""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle, greedy, run_all
from tests.engine.reference import hf_greedy, hf_model_from_weights, make_tiny_random_checkpoint

NUM_NEW = 12


def small_config(**overrides) -> EngineConfig:
    base = dict(dtype="float32", num_threads=2, max_model_len=256, max_num_seqs=16, max_num_batched_tokens=16,
                tokens_per_page=16, device_memory_bytes=1 << 30, host_buffer_bytes=64 << 20)
    base.update(overrides)
    return EngineConfig(**base)


@pytest.fixture(scope="module")
def reference(prompts, hf_smollm2):
    return hf_greedy(hf_smollm2, prompts, NUM_NEW)




def assert_same(ours: dict[str, list[int]], reference: list[list[int]]) -> None:
    for index, expected in enumerate(reference):
        got = ours[f"r{index}"][: len(expected)]
        assert got == expected, f"prompt {index}: {got} != {expected}"


@pytest.fixture(scope="module")
def engine(smollm2_tokenizer):
    engine = LLMEngine(small_config(), tokenizer=smollm2_tokenizer)
    yield engine
    engine.close()


def test_batched_chunked_prefill_matches_transformers(engine, prompts, reference):
    assert max(len(p) for p in prompts) > engine.config.max_num_batched_tokens  # prompts really get split
    ours = run_all(engine, prompts, greedy(NUM_NEW))
    assert_same(ours, reference)
    assert all(len(tokens) == NUM_NEW for tokens in ours.values())
    assert_pool_idle(engine)


def test_prefix_cache_reuses_pages_and_gives_same_tokens(engine, prompts, reference):
    long_prompt = prompts[6]
    hits_before = engine.kv.prefix.num_hit_tokens
    first = run_all(engine, [long_prompt], greedy(NUM_NEW), prefix="a")
    second = run_all(engine, [long_prompt], greedy(NUM_NEW), prefix="b")
    page = engine.config.tokens_per_page
    expected_hit = (len(long_prompt) - 1) // page * page
    assert engine.kv.prefix.num_hit_tokens - hits_before >= expected_hit > 0
    assert first["a0"] == second["b0"]
    assert second["b0"][: len(reference[6])] == reference[6]
    assert_pool_idle(engine)


@pytest.fixture(scope="module")
def long_reference(prompts, hf_smollm2):
    return hf_greedy(hf_smollm2, prompts, NUM_NEW_LONG)


NUM_NEW_LONG = 40


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_keeps_greedy_tokens(smollm2_tokenizer, engine, prompts, long_reference, mode):
    weights = engine.pool.num_held("weights") * engine.pool.chunk_bytes
    workspace = engine.peak_activation_bytes
    kv_per_token = engine.kv_spec.bytes_per_token * 2 * engine.kv_spec.num_layers
    # KV room for ~120 tokens while the 8 requests need ~270: someone must be preempted
    budget = weights + workspace + 120 * kv_per_token
    small = LLMEngine(small_config(device_memory_bytes=budget, preemption_mode=mode, enable_prefix_caching=False),
                      tokenizer=smollm2_tokenizer)
    try:
        ours = run_all(small, prompts, greedy(NUM_NEW_LONG))
        assert small.scheduler.num_preemptions > 0
        if mode == "swap":
            assert small.scheduler.num_swaps > 0 and small.pool.telemetry().bytes_swapped_in > 0
        else:
            assert small.scheduler.num_recomputes > 0
        assert_same(ours, long_reference)
        assert_pool_idle(small)
    finally:
        small.close()


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_sliding_window_models_match_transformers(tmp_path, arch, smollm2_tokenizer):
    # window 40 over 32-token pages: long prompts slide whole pages out of the window mid-request
    directory = make_tiny_random_checkpoint(tmp_path / arch, arch=arch, sliding_window=40)
    hf = hf_model_from_weights(str(directory), dtype=torch.float32)
    long_text = " ".join(PROMPTS[6:8] * 3)
    prompts = [smollm2_tokenizer(text).input_ids for text in [*PROMPTS[:4], long_text, long_text[40:]]]
    reference = hf_greedy(hf, prompts, 24)
    engine = LLMEngine(small_config(model=str(directory), max_num_batched_tokens=24, tokens_per_page=32),
                       tokenizer=smollm2_tokenizer)
    try:
        assert engine.model_config.sliding_window == 40
        assert max(len(p) for p in prompts) > 40 + 32  # pages really leave the window
        ours = run_all(engine, prompts, greedy(24))
        assert_same(ours, reference)
        assert_pool_idle(engine)
    finally:
        engine.close()
