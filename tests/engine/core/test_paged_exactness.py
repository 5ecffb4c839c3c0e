"""The `paged` KV layout gives transformers' greedy tokens on SmolLM2: batched chunked prefill, prefix
hits (shared blocks mapped once, read through two slots' tables) and swap preemption."""

from __future__ import annotations

import pytest

from engine.core.engine import LLMEngine
from tests.engine.core.test_engine_exactness import NUM_NEW, NUM_NEW_LONG, assert_same, small_config
from tests.engine.engine_helpers import assert_pool_idle, greedy, run_all
from tests.engine.reference import hf_greedy


def test_paged_batched_prefill_and_prefix_hits_match_transformers(smollm2_tokenizer, hf_smollm2, prompts):
    chosen = [prompts[0], prompts[4], prompts[6]]  # short, two pages, three pages
    reference = hf_greedy(hf_smollm2, chosen, NUM_NEW)
    engine = LLMEngine(small_config(kv_layout="paged"), tokenizer=smollm2_tokenizer)
    try:
        assert_same(run_all(engine, chosen, greedy(NUM_NEW)), reference)
        hits = engine.kv.prefix.num_hit_tokens
        again = run_all(engine, [chosen[2], chosen[2]], greedy(NUM_NEW), prefix="b")
        assert engine.kv.prefix.num_hit_tokens - hits >= 2 * ((len(chosen[2]) - 1) // 16 * 16)
        assert again["b0"] == again["b1"] and again["b0"][: len(reference[2])] == reference[2]
        assert_pool_idle(engine)
    finally:
        engine.close()


@pytest.mark.slow
def test_paged_swap_preemption_matches_transformers(smollm2_tokenizer, hf_smollm2, prompts):
    reference = hf_greedy(hf_smollm2, prompts, NUM_NEW_LONG)
    probe = LLMEngine(small_config(), tokenizer=smollm2_tokenizer)
    weights = probe.pool.num_held("weights") * probe.pool.chunk_bytes
    budget = weights + probe.peak_activation_bytes + 120 * probe.kv_spec.bytes_per_token * 2 * probe.kv_spec.num_layers
    probe.close()
    engine = LLMEngine(small_config(kv_layout="paged", device_memory_bytes=budget, preemption_mode="swap",
                                    enable_prefix_caching=False), tokenizer=smollm2_tokenizer)
    try:
        ours = run_all(engine, prompts, greedy(NUM_NEW_LONG))
        assert engine.scheduler.num_swaps > 0
        assert_same(ours, reference)
        assert_pool_idle(engine)
    finally:
        engine.close()
