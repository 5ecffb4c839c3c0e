"""ModelConfig from HF config.json dicts (each supported family) and from GGUF metadata."""

from __future__ import annotations

import dataclasses

import pytest
from transformers import LlamaConfig, MinistralConfig, MistralConfig, Qwen2Config, Qwen3Config

from engine.model.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig, model_config_from_gguf
from engine.weights.gguf_file import GgufFile

F, S = FULL_ATTENTION, SLIDING_ATTENTION
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2)


def test_smollm2_style_llama_config():
    config = ModelConfig.from_hf_config({
        "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
        "rope_theta": 100000, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2, "rope_scaling": None,
    })
    assert (config.head_dim, config.num_queries_per_kv, config.rope_theta) == (64, 3, 100000.0)
    assert config.layer_types == (F,) * 30 and config.sliding_window is None
    assert config.eos_token_ids == (2,) and config.tie_word_embeddings
    assert not config.use_qk_norm and not config.attention_bias and config.rope_scaling is None


@pytest.mark.parametrize(("hf_config", "expected_kinds", "expected_window"), [
    (MistralConfig(**SMALL, sliding_window=16), (S,) * 4, 16),
    (MistralConfig(**SMALL, sliding_window=None), (F,) * 4, None),
    (MinistralConfig(**SMALL, sliding_window=16, layer_types=[S, F, S, F]), (S, F, S, F), 16),
    (Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=32, max_window_layers=2), (F, F, S, S), 32),
    (Qwen2Config(**SMALL, use_sliding_window=False, sliding_window=32), (F,) * 4, None),
    (Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=8, layer_types=[S, F, F, S]), (S, F, F, S), 8),
    (LlamaConfig(**SMALL), (F,) * 4, None),
])
def test_layer_kinds_follow_transformers(hf_config, expected_kinds, expected_window):
    config = ModelConfig.from_hf_config(hf_config.to_dict())
    assert config.layer_types == expected_kinds
    assert config.sliding_window == expected_window
    if getattr(hf_config, "layer_types", None) is not None and hf_config.model_type != "mistral":
        hf_kinds = tuple(hf_config.layer_types)
        if hf_config.sliding_window is None:  # HF keeps the labels but slides nothing
            hf_kinds = (F,) * len(hf_kinds)
        assert config.layer_types == hf_kinds


def test_family_switches():
    qwen2 = ModelConfig.from_hf_config(Qwen2Config(**SMALL).to_dict())
    qwen3 = ModelConfig.from_hf_config(Qwen3Config(**SMALL, head_dim=32).to_dict())
    assert qwen2.attention_bias and not qwen2.use_qk_norm
    assert qwen3.use_qk_norm and not qwen3.attention_bias and qwen3.head_dim == 32
    assert ModelConfig.from_hf_config(LlamaConfig(**SMALL, attention_bias=True).to_dict()).attention_bias


def test_rope_spellings_of_transformers_4_and_5():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    old = ModelConfig.from_hf_config({**LlamaConfig(**SMALL).to_dict(), "rope_parameters": None,
                                      "rope_theta": 500000.0, "rope_scaling": {**llama3, "type": "llama3"}})
    new = ModelConfig.from_hf_config({**LlamaConfig(**SMALL).to_dict(),
                                      "rope_parameters": {**llama3, "rope_theta": 500000.0}})
    assert old.rope_theta == new.rope_theta == 500000.0
    assert old.rope_scaling == new.rope_scaling == tuple(sorted(llama3.items()))
    hash(new)  # frozen all the way down
    default = ModelConfig.from_hf_config(LlamaConfig(**SMALL).to_dict())
    assert default.rope_scaling is None and default.rope_theta == 10000.0


@pytest.mark.parametrize(("eos", "expected"), [(7, (7,)), ([7, 9, 7], (7, 9)), (None, ())])
def test_eos_ids_int_or_list(eos, expected):
    assert ModelConfig.from_hf_config({**LlamaConfig(**SMALL).to_dict(), "eos_token_id": eos}).eos_token_ids == expected


def test_to_hf_config_round_trips():
    for hf_config in (Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=8, layer_types=[S, F, F, S]),
                      Qwen2Config(**SMALL), MistralConfig(**SMALL, sliding_window=16),
                      MinistralConfig(**SMALL, sliding_window=16, layer_types=[S, F, S, F]), LlamaConfig(**SMALL)):
        config = ModelConfig.from_hf_config(hf_config.to_dict())
        assert ModelConfig.from_hf_config(config.to_hf_config()) == config


def test_unsupported_model_type_is_refused():
    with pytest.raises(ValueError, match="unsupported model_type"):
        ModelConfig.from_hf_config({**LlamaConfig(**SMALL).to_dict(), "model_type": "gpt2"})


@pytest.mark.parametrize(("field", "value", "match"), [
    ("num_kv_heads", 3, "multiple"),
    ("head_dim", 7, "even"),
    ("layer_types", (F,) * 3, "layer_types"),
    ("layer_types", (S,) * 4, "sliding_window"),
    ("sliding_window", 8, "no layer"),
    ("layer_types", ("linear_attention",) * 4, "unknown layer kinds"),
    ("eos_token_ids", (5000,), "eos_token_ids"),
    ("rope_scaling", (("factor", [1, 2]),), "unhashable"),
    ("hidden_size", 0, "positive"),
])
def test_post_init_rejects_inconsistent_configs(field, value, match):
    config = ModelConfig.from_hf_config(LlamaConfig(**SMALL).to_dict())
    with pytest.raises((ValueError, TypeError), match=match):
        dataclasses.replace(config, **{field: value})


def test_gguf_metadata(smollm2_source):
    gguf = GgufFile(smollm2_source.path)
    config = model_config_from_gguf(gguf.metadata, gguf.tensors.keys())
    assert (config.architecture, config.num_layers, config.hidden_size, config.intermediate_size) == (
        "llama", 30, 576, 1536)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.vocab_size) == (9, 3, 64, 49152)
    assert config.rope_theta == 100000.0 and config.max_position_embeddings == 8192
    assert config.tie_word_embeddings and config.layer_types == (F,) * 30
    assert (config.bos_token_id, config.eos_token_ids) == (1, (2,))
    assert config.rms_norm_eps == pytest.approx(1e-5)


def test_gguf_metadata_for_qwen3_with_window():
    metadata = {"general.architecture": "qwen3", "qwen3.block_count": 2, "qwen3.embedding_length": 64,
                "qwen3.feed_forward_length": 128, "qwen3.attention.head_count": 4,
                "qwen3.attention.head_count_kv": 2, "qwen3.attention.key_length": 32, "qwen3.vocab_size": 100,
                "qwen3.attention.sliding_window": 16, "tokenizer.ggml.eos_token_id": 5,
                "tokenizer.ggml.eot_token_id": 6}
    names = {"output.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_q.weight"}
    config = model_config_from_gguf(metadata, names)
    assert config.use_qk_norm and not config.tie_word_embeddings and config.head_dim == 32
    assert config.layer_types == (S, S) and config.sliding_window == 16 and config.eos_token_ids == (5, 6)
