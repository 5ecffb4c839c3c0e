"""Gemma 3: config from GGUF and HF, the embedded model's source, and greedy tokens equal transformers'.

The default suite runs a tiny random Gemma 3 (every Gemma-specific switch moved off the 270M model's
defaults: query scale, logit soft-cap, scaled global RoPE, untied head) through the engine; the real
Gemma 3 270M runs under `slow` (loading it and transformers' reference takes about a minute here).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Gemma3TextConfig

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.model.config import FULL_ATTENTION, GEMMA3, SLIDING_ATTENTION, ModelConfig, model_config_from_gguf
from engine.weights import gemma3_gguf_path, resolve_model_source
from engine.weights.gguf_file import GgufFile
from tests.engine.core.test_engine_exactness import small_config as exactness_config
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle, greedy, run_all
from tests.engine.reference import hf_greedy, hf_model_from_weights, make_tiny_random_checkpoint

F, S = FULL_ATTENTION, SLIDING_ATTENTION


@pytest.fixture(scope="module")
def gemma3_source():
    return resolve_model_source("gemma3-270m")


def test_short_names_resolve(gemma3_source, smollm2_source):
    assert resolve_model_source("smollm2-135m") == resolve_model_source(None) == smollm2_source
    assert gemma3_source.format == "gguf" and gemma3_source.path.name == "gemma-3-270m-q4_k_m.gguf"
    assert resolve_model_source("Gemma3-270M") == gemma3_source


def test_assembled_file_is_reused_from_the_cache(tmp_path):
    cached = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    cached.write_bytes(b"already assembled")  # present = verified: never re-hashed nor re-assembled
    assert gemma3_gguf_path(tmp_path) == cached
    assert cached.read_bytes() == b"already assembled"


def test_config_from_gguf(gemma3_source):
    gguf = GgufFile(gemma3_source.path)
    config = model_config_from_gguf(gguf.metadata, gguf.tensors.keys())
    assert config.architecture == GEMMA3
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            config.intermediate_size, config.vocab_size) == (18, 640, 4, 1, 256, 2048, 262144)
    assert config.layer_types == ((S,) * 5 + (F,)) * 3 and config.sliding_window == 512
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling) == (1e6, 1e4, None)
    assert (config.query_pre_attn_scalar, config.final_logit_softcapping) == (256, None)
    assert config.tie_word_embeddings and config.use_qk_norm and not config.attention_bias
    assert (config.bos_token_id, config.eos_token_ids, config.max_position_embeddings) == (2, (1,), 32768)
    # transformers reads the same model from our HF config, and we read it back unchanged
    assert ModelConfig.from_hf_config(config.to_hf_config()) == config
    hf = Gemma3TextConfig(**{k: v for k, v in config.to_hf_config().items() if k != "model_type"})
    assert tuple(hf.layer_types) == config.layer_types and hf.query_pre_attn_scalar == 256


def test_hf_config_of_transformers_4_spelling():
    config = ModelConfig.from_hf_config({
        "model_type": "gemma3_text", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
        "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 16, "sliding_window_pattern": 6,
        "query_pre_attn_scalar": 48, "final_logit_softcapping": 30.0, "rope_scaling": {"rope_type": "linear",
                                                                                       "factor": 8.0},
    })
    assert config.layer_types == (S,) * 5 + (F, S)
    assert (config.rope_local_theta, config.query_pre_attn_scalar, config.final_logit_softcapping) == (1e4, 48, 30.0)
    assert config.rope_scaling == (("factor", 8.0), ("rope_type", "linear"))
    with pytest.raises(ValueError, match="rope_local_theta"):
        dataclasses.replace(config, rope_local_theta=None)


def small_config(**overrides) -> EngineConfig:
    return exactness_config(**{"max_num_batched_tokens": 24, "tokens_per_page": 32, **overrides})


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Gemma 3 (window 40) and transformers' greedy tokens for its prompts."""
    directory = make_tiny_random_checkpoint(tmp_path_factory.mktemp("tiny-gemma3"), arch="gemma3",
                                            layer_types=(S, S, F, S, F), sliding_window=40)
    hf = hf_model_from_weights(str(directory), dtype=torch.float32)
    long_text = " ".join(PROMPTS[6:8] * 3)
    prompts = [smollm2_tokenizer(text).input_ids for text in [*PROMPTS[:4], long_text, long_text[40:]]]
    reference = hf_greedy(hf, prompts, 16)
    assert len({tuple(tokens) for tokens in reference}) == len(reference)  # decisive, distinct outputs
    return directory, prompts, reference


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_tiny_gemma3_matches_transformers(tiny_gemma3, smollm2_tokenizer, layout):
    """Batching, chunked prefill (24-token budget) and a 40-token window over 32-token pages."""
    directory, prompts, reference = tiny_gemma3
    engine = LLMEngine(small_config(model=str(directory), kv_layout=layout), tokenizer=smollm2_tokenizer)
    try:
        assert engine.model_config.query_pre_attn_scalar != engine.model_config.head_dim
        assert engine.kv.evictor == "prefix_subset"  # kv_evictor: auto, for a model with sliding layers
        assert max(len(p) for p in prompts) > 40 + 32  # pages really leave the window
        ours = run_all(engine, prompts, greedy(16))
        assert [ours[f"r{i}"] for i in range(len(prompts))] == reference
        assert_pool_idle(engine)
    finally:
        engine.close()


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("copy_kv", [True, False], ids=["copy", "recompute"])
def test_tiny_gemma3_migrated_request_matches_transformers(tiny_gemma3, smollm2_tokenizer, copy_kv, layout):
    """A request past its 40-token window moves to another engine (same layout) mid-decode, its KV copied
    in stages (only the pages each kind still holds) or recomputed; tokens stay transformers'."""
    from engine import migration
    from tests.engine.engine_helpers import collect_steps

    directory, prompts, reference = tiny_gemma3
    prompt, expected = prompts[4], reference[4]
    assert len(prompt) > 40 + 32
    config = small_config(model=str(directory), kv_layout=layout)
    source = LLMEngine(config, tokenizer=smollm2_tokenizer)
    destination = LLMEngine(config, tokenizer=smollm2_tokenizer)
    try:
        tokens: dict[str, list[int]] = {}
        source.add_request(GenerateRequest("m", tuple(prompt), greedy(16)))
        collect_steps(source, tokens, steps=6)
        stages = [migration.copy_kv(source, "m", 0)]
        collect_steps(source, tokens, steps=2)
        snapshot = migration.pause(source, "m")
        stages.append(migration.copy_kv(source, "m", stages[-1].end))
        assert stages[-1].end == snapshot.num_computed_tokens > 40 + 32
        assert migration.reserve(destination, "m", snapshot.num_tokens)
        if copy_kv:
            for stage in stages:
                migration.write_kv(destination, "m", stage)
        migration.attach(destination, snapshot, snapshot.num_computed_tokens if copy_kv else 0)
        migration.release(source, "m")
        assert_pool_idle(source)
        collect_steps(destination, tokens)
        assert tokens["m"] == expected
        assert_pool_idle(destination)
    finally:
        source.close()
        destination.close()


@pytest.fixture(scope="module")
def tiny_gemma3_shared(tiny_gemma3):
    """The long prompt, and two prompts sharing its first 100 tokens (three 32-token pages: a hit of 96
    tokens, past the 40-token window and a page), with transformers' greedy tokens."""
    directory, prompts, _ = tiny_gemma3
    shared = prompts[4][:100]
    variants = [prompts[4], shared + prompts[0], shared + prompts[3]]
    hf = hf_model_from_weights(str(directory), dtype=torch.float32)
    return variants, hf_greedy(hf, variants, 16)


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_tiny_gemma3_prefix_hits_past_the_window_match_transformers(tiny_gemma3, tiny_gemma3_shared,
                                                                    smollm2_tokenizer, layout):
    """After the long prompt ran, it again and two prompts on its first 100 tokens hit past the window:
    the sliding layers map only the window's pages (never page 0), and tokens stay transformers'."""
    directory = tiny_gemma3[0]
    prompts, reference = tiny_gemma3_shared
    engine = LLMEngine(small_config(model=str(directory), kv_layout=layout), tokenizer=smollm2_tokenizer)
    try:
        page = engine.kv_spec.tokens_per_page
        sliding = [g for g, group in enumerate(engine.kv_spec.groups) if group.sliding_window is not None]
        assert page == 32 and sliding
        assert run_all(engine, prompts[:1], greedy(16)) == {"r0": reference[0]}
        hits = engine.kv.prefix.num_hit_tokens
        tokens: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            engine.add_request(GenerateRequest(f"b{index}", tuple(prompt), greedy(16)))
        seen = set()
        while engine.has_work:
            for output in engine.step():
                tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            for request_id, state in engine.kv.requests.items():
                seen.add(request_id)
                assert all(state.blocks[g][0] is None for g in sliding)  # page 0 left every window
        assert seen == {"b0", "b1", "b2"}
        assert [tokens[f"b{i}"] for i in range(3)] == reference
        assert engine.kv.prefix.num_hit_tokens - hits == (len(prompts[0]) - 1) // page * page + 2 * 3 * page
        assert engine.scheduler.num_preemptions == 0
        assert_pool_idle(engine)
    finally:
        engine.close()


@pytest.fixture(scope="module")
def tiny_gemma3_preempt(tiny_gemma3):
    """The long prompt first, then the short ones, with 80 new tokens each (their outputs grow by two or
    three pages, so they outgrow the KV share of `preempting_config`)."""
    directory, prompts, _ = tiny_gemma3
    ordered = [prompts[4], *prompts[:4]]
    hf = hf_model_from_weights(str(directory), dtype=torch.float32)
    return ordered, hf_greedy(hf, ordered, 80)


@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_tiny_gemma3_preempted_matches_transformers(tiny_gemma3, tiny_gemma3_preempt, smollm2_tokenizer,
                                                    mode, layout):
    """Past its 40-token window, under swap or recompute preemption (only `mode`, asserted by the
    scheduler's counters), on both layouts: tokens stay transformers'."""
    prompts, reference = tiny_gemma3_preempt
    base = small_config(model=str(tiny_gemma3[0]), kv_layout=layout, preemption_mode=mode, tokens_per_page=16)
    config = preempting_config(smollm2_tokenizer, prompts, base, 80)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    try:
        ours = run_all(engine, prompts, greedy(80))
        assert [ours[f"r{i}"] for i in range(len(prompts))] == reference
        swaps, recomputes = engine.scheduler.num_swaps, engine.scheduler.num_recomputes
        assert (swaps > 0, recomputes > 0) == ((True, False) if mode == "swap" else (False, True))
        assert_pool_idle(engine)
    finally:
        engine.close()


# ---- the real Gemma 3 270M (slow) ---------------------------------------------------------------
NUM_NEW = 10


@pytest.fixture(scope="module")
def gemma3_tokenizer(gemma3_source):
    from engine.text.tokenizer import load_tokenizer

    return load_tokenizer(gemma3_source)


@pytest.fixture(scope="module")
def gemma3_fp32(gemma3_source):
    from engine.weights import load_weights

    return load_weights(gemma3_source, dtype=torch.float32, show_progress=False)


@pytest.fixture(scope="module")
def gemma3_prompts(gemma3_tokenizer):
    # the last prompt is longer than the 512-token window, so sliding layers drop pages mid-prefill
    long_text = " ".join(PROMPTS * 8)
    prompts = [gemma3_tokenizer(text).input_ids for text in [*PROMPTS[:5], long_text]]
    assert len(prompts[-1]) > 600
    return prompts


@pytest.fixture(scope="module")
def gemma3_hf(gemma3_source, gemma3_fp32):
    return hf_model_from_weights(gemma3_source, dtype=torch.float32, loaded=gemma3_fp32)


@pytest.fixture(scope="module")
def gemma3_reference(gemma3_hf, gemma3_prompts):
    return hf_greedy(gemma3_hf, gemma3_prompts, NUM_NEW)


# preemption: the long prompt is admitted first, then short ones whose outputs outgrow the KV share
NUM_NEW_PREEMPT = 32


@pytest.fixture(scope="module")
def gemma3_preempt_prompts(gemma3_tokenizer, gemma3_prompts):
    return [gemma3_prompts[-1], *(gemma3_tokenizer(text).input_ids for text in PROMPTS[2:8])]


@pytest.fixture(scope="module")
def gemma3_preempt_reference(gemma3_hf, gemma3_preempt_prompts):
    return hf_greedy(gemma3_hf, gemma3_preempt_prompts, NUM_NEW_PREEMPT)


def gemma3_config(**overrides) -> EngineConfig:
    return small_config(**{"model": "gemma3-270m", "max_model_len": 1024, "max_num_seqs": 8,
                           "max_num_batched_tokens": 128, "tokens_per_page": 64, "device_memory_bytes": 3 << 30,
                           **overrides})


@pytest.mark.slow
def test_gemma3_weights_equal_transformers_gguf_loading(gemma3_source, gemma3_fp32):
    """Our dequantization (K-quants included), name map and norm offsets against transformers' own."""
    from tests.engine.reference import hf_gguf_tensors

    _, weights = gemma3_fp32
    reference = hf_gguf_tensors(gemma3_source)
    assert set(reference) - {"lm_head.weight"} == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name].float()), name


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gemma3_270m_matches_transformers(gemma3_tokenizer, gemma3_prompts, gemma3_reference, layout):
    """Batched chunked prefill (128-token budget) with a prompt longer than the 512-token window, then a
    prefix hit on it that reaches past the window."""
    engine = LLMEngine(gemma3_config(kv_layout=layout), tokenizer=gemma3_tokenizer)
    try:
        assert engine.kv.layout.name == layout
        assert len(gemma3_prompts[-1]) > 512 + engine.kv_spec.tokens_per_page  # pages leave the window
        ours = run_all(engine, gemma3_prompts, greedy(NUM_NEW))
        assert [ours[f"r{i}"] for i in range(len(gemma3_prompts))] == gemma3_reference
        assert engine.scheduler.num_preemptions == 0
        # the long prompt again: a prefix hit past the window (sliding layers map only the window's pages)
        hits = engine.kv.prefix.num_hit_tokens
        again = run_all(engine, [gemma3_prompts[-1]], greedy(NUM_NEW), prefix="b")
        assert engine.kv.prefix.num_hit_tokens - hits > 512 + engine.kv_spec.tokens_per_page
        assert again["b0"] == gemma3_reference[-1]
        assert_pool_idle(engine)
    finally:
        engine.close()


def preempting_config(tokenizer, prompts, base: EngineConfig, num_new: int = NUM_NEW_PREEMPT) -> EngineConfig:
    """A static pool whose KV share holds the first (long) prompt grown by all its new tokens, every short
    prompt admitted, and only 30% of what the short ones grow by decoding: they must preempt each other."""
    base = dataclasses.replace(base, pool_policy="static", enable_prefix_caching=False)
    probe = LLMEngine(base, tokenizer=tokenizer)
    try:
        def need(num_tokens: int) -> int:
            return probe.kv.chunks_to_grow(None, num_tokens)

        admitted = need(len(prompts[0]) + num_new) + sum(need(len(p) + 1) for p in prompts[1:])
        grown = sum(need(len(p) + num_new) - need(len(p) + 1) for p in prompts[1:])
        not_kv = probe.pool.num_chunks - probe.pool.policy.shares["kv"]
        chunk_bytes = probe.pool.chunk_bytes
    finally:
        probe.close()
    return dataclasses.replace(base, device_memory_bytes=(not_kv + admitted + grown * 3 // 10) * chunk_bytes)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["swap", "recompute"])
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_gemma3_270m_preempted_matches_transformers(gemma3_tokenizer, gemma3_preempt_prompts,
                                                    gemma3_preempt_reference, mode, layout):
    """Running requests whose outputs outgrow the KV share are preempted (by `mode` only, asserted by the
    scheduler's counters) and resumed; greedy tokens stay transformers'."""
    prompts = gemma3_preempt_prompts
    base = gemma3_config(tokens_per_page=16, kv_layout=layout, preemption_mode=mode)
    config = preempting_config(gemma3_tokenizer, prompts, base)
    engine = LLMEngine(config, tokenizer=gemma3_tokenizer)
    try:
        assert engine.kv.layout.name == layout
        ours = run_all(engine, prompts, greedy(NUM_NEW_PREEMPT))
        assert [ours[f"r{i}"] for i in range(len(prompts))] == gemma3_preempt_reference
        swaps, recomputes = engine.scheduler.num_swaps, engine.scheduler.num_recomputes
        assert (swaps > 0, recomputes > 0) == ((True, False) if mode == "swap" else (False, True))
        assert_pool_idle(engine)
    finally:
        engine.close()
