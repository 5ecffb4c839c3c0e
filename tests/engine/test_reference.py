"""The transformers reference helpers themselves: they must be trustworthy before others compare to them."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.text.tokenizer import encode_chat
from tests.engine.reference import hf_greedy, hf_model_from_source

# transformers' greedy reply of SmolLM2-135M-Instruct (Q4_1 GGUF, fp32) to the question below.
PARIS = [504, 3575, 282, 4649, 314, 7042, 30, 2]  # "The capital of France is Paris.<|im_end|>"


def test_smollm2_reference_answers_sensibly(hf_smollm2, smollm2_tokenizer):
    prompt = encode_chat(smollm2_tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    (reply,) = hf_greedy(hf_smollm2, [prompt], max_new_tokens=16)
    assert reply == PARIS
    assert smollm2_tokenizer.decode(reply, skip_special_tokens=True) == "The capital of France is Paris."


@pytest.mark.slow
def test_reference_from_our_weights_equals_transformers_gguf_loading(hf_smollm2, smollm2_tokenizer):
    prompts = [smollm2_tokenizer.encode(text) for text in ("Once upon a time", "def fibonacci(n):", "1, 2, 3,")]
    from_gguf = hf_model_from_source(None)
    assert hf_greedy(from_gguf, prompts, 12) == hf_greedy(hf_smollm2, prompts, 12)


@pytest.mark.parametrize("fixture", ["tiny_qwen3_dir", "tiny_mistral_dir"])
def test_tiny_checkpoint_really_uses_its_sliding_window(fixture, request):
    directory = request.getfixturevalue(fixture)
    model = hf_model_from_source(str(directory))
    config = json.loads((directory / "config.json").read_text())
    assert "sliding_attention" in config["layer_types"] and "full_attention" in config["layer_types"]
    prompt = list(range(100, 100 + 3 * config["sliding_window"]))
    full_config = model.config.__class__.from_dict({**config, "layer_types": ["full_attention"] * 4})
    all_full = AutoModelForCausalLM.from_config(full_config, dtype=torch.float32).eval()
    all_full.load_state_dict(model.state_dict())
    with torch.no_grad():
        windowed = model(torch.tensor([prompt])).logits
        unwindowed = all_full(torch.tensor([prompt])).logits
    window = config["sliding_window"]
    # Inside the window both agree; beyond it the sliding layers see less context.
    assert torch.allclose(windowed[0, :window], unwindowed[0, :window], atol=1e-5)
    assert not torch.allclose(windowed[0, -1], unwindowed[0, -1], atol=1e-3)
    # Random weights with a wide init still give decisive greedy choices (no near-ties to flake on).
    top2 = windowed[0].topk(2, dim=-1).values
    assert float((top2[:, 0] - top2[:, 1]).median()) > 1e-3
    (tokens,) = hf_greedy(model, [prompt], max_new_tokens=4)
    assert len(tokens) == 4
