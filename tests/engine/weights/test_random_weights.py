"""`random:DIR`: transformers' tensor names and shapes for DIR/config.json, random values, a numbered tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.weights import load_weights, resolve_model_source
from tests.engine.engine_helpers import greedy, run_all

CONFIG = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
          "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    return tmp_path


def test_random_weights_have_transformers_names_and_shapes(model_dir):
    source = resolve_model_source(f"random:{model_dir}")
    assert source.format == "random" and source.name == f"{model_dir.name}-random"
    config, weights = load_weights(source, torch.bfloat16, show_progress=False)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG))
    assert {name: tuple(t.shape) for name, t in weights.items()} == {
        name: tuple(p.shape) for name, p in hf.named_parameters()}
    assert all(t.dtype == torch.bfloat16 and t.device.type == "cpu" for t in weights.values())
    q = weights["model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.5 < float(q.std()) * 64 ** 0.5 < 1.5  # N(0, 1/fan_in)
    assert torch.equal(weights["model.norm.weight"].float(), torch.ones(64))
    assert config.num_layers == 2 and config.vocab_size == 300
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model_source(f"random:{model_dir / 'missing'}")


def test_the_engine_serves_a_random_model_with_a_numbered_tokenizer(model_dir):
    engine = LLMEngine(EngineConfig(model=f"random:{model_dir}", dtype="float32", max_model_len=64,
                                    device_memory_bytes=64 << 20, host_buffer_bytes=0, tokens_per_page=16))
    try:
        assert engine.tokenizer.convert_ids_to_tokens([7, 299]) == ["<7>", "<299>"]
        first = run_all(engine, [[5, 6, 7], [9] * 20], greedy(4))
        again = run_all(engine, [[5, 6, 7], [9] * 20], greedy(4))
        assert first == again and all(len(tokens) == 4 for tokens in first.values())
    finally:
        engine.close()
