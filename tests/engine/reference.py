"""Hugging Face transformers as the reference for the same weights (tests import this module).

- `hf_model_from_source`: the transformers model for a ModelSource (GGUF through `gguf_file=`,
  which dequantizes and un-permutes on its own, so it is an independent check of our loader).
- `hf_model_from_weights`: the same transformers model class filled with *our* loaded tensors
  (~3 s instead of ~20 s for transformers' GGUF path); right once the loader test has shown our
  tensors equal transformers' own (`hf_gguf_tensors`).
- `hf_greedy`: transformers' greedy tokens, one prompt at a time (no padding to reason about).
- `make_tiny_random_checkpoint`: a tiny randomly initialised Qwen3 / Mistral-style checkpoint with
  mixed sliding-window and full-attention layers (or a plain Llama), written as config.json +
  safetensors + tokenizer, built without any download.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from engine.model.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig
from engine.text.tokenizer import load_tokenizer
from engine.weights import ModelSource, load_weights, resolve_model_source
from loadtest.offline.hf import hf_model

DEFAULT_TINY_LAYER_TYPES = (SLIDING_ATTENTION, FULL_ATTENTION, SLIDING_ATTENTION, FULL_ATTENTION)


def hf_model_from_source(source: ModelSource | str | Path | None, dtype: torch.dtype = torch.float32
                         ) -> PreTrainedModel:
    source = source if isinstance(source, ModelSource) else resolve_model_source(source)
    kwargs = {"gguf_file": source.gguf_file} if source.format == "gguf" else {}
    model = AutoModelForCausalLM.from_pretrained(source.directory, dtype=dtype, **kwargs)
    return model.eval()


def hf_model_from_weights(source: ModelSource | str | Path | None, dtype: torch.dtype = torch.float32,
                          loaded: tuple[ModelConfig, dict[str, torch.Tensor]] | None = None) -> PreTrainedModel:
    """transformers' model for `source`'s architecture, holding the tensors our loader produced
    (pass `loaded=load_weights(...)` to reuse tensors already in memory; they are shared, not copied)."""
    source = source if isinstance(source, ModelSource) else resolve_model_source(source)
    return hf_model(source, dtype, loaded)


def hf_gguf_tensors(source: ModelSource | str | Path | None) -> dict[str, torch.Tensor]:
    """The HF-named float tensors transformers itself makes of a GGUF file (its dequantizer and its
    Q/K un-permutation), without building the model (~9 s for SmolLM2 instead of ~20 s)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    source = source if isinstance(source, ModelSource) else resolve_model_source(source)
    config, _ = load_weights(source, dtype=torch.float32, show_progress=False)
    hf_config = AutoConfig.for_model(**config.to_hf_config())
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    checkpoint = load_gguf_checkpoint(str(source.path), return_tensors=True, model_to_load=skeleton)
    return {name: torch.as_tensor(tensor) for name, tensor in checkpoint["tensors"].items()}


@torch.inference_mode()
def hf_greedy(model: PreTrainedModel, prompts_token_ids: Sequence[Sequence[int]], max_new_tokens: int
              ) -> list[list[int]]:
    """New tokens per prompt from `generate(do_sample=False)` with the model's own generation config
    (so it stops after EOS, which is included). Passing eos_token_id=None is deliberately avoided:
    on this transformers version it changed the greedy tokens, not only where they stop."""
    outputs = []
    for prompt in prompts_token_ids:
        input_ids = torch.tensor([list(prompt)], dtype=torch.long, device=model.device)
        generated = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
            max_new_tokens=max_new_tokens, top_k=None, top_p=None, temperature=None,
        )
        outputs.append(generated[0, input_ids.shape[1]:].tolist())
    return outputs


def _tiny_config(arch: str, vocab_size: int, layer_types: Sequence[str], sliding_window: int,
                 bos_token_id: int | None, eos_token_id: int | None):
    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
        rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, sliding_window=sliding_window, layer_types=list(layer_types),
    )
    if arch == "llama":  # every layer full attention
        from transformers import LlamaConfig

        del common["sliding_window"], common["layer_types"]
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common, use_sliding_window=True, max_window_layers=0,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "mistral":
        # Mistral itself slides every layer and ignores layer_types; Ministral is the Mistral-style
        # model that transformers runs with per-layer attention kinds.
        from transformers import MinistralConfig

        return MinistralConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    if arch == "gemma3":
        # Gemma 3 with what the 270M model leaves at defaults moved off them: a query scale that is
        # not head_dim, a final logit soft-cap, a scaled global RoPE.
        from transformers import Gemma3TextConfig

        return Gemma3TextConfig(**common, query_pre_attn_scalar=24, final_logit_softcapping=30.0,
                                rope_parameters={
                                    FULL_ATTENTION: {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                                    SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": 10000.0}})
    raise ValueError(f"unknown tiny architecture {arch!r} (llama | qwen3 | mistral | gemma3)")




def make_tiny_random_checkpoint(
    tmp_dir: str | Path,
    arch: str = "qwen3",
    layer_types: Sequence[str] = DEFAULT_TINY_LAYER_TYPES,
    sliding_window: int = 8,
    seed: int = 0,
    tokenizer_cache_dir: Path | str | bool | None = True,
    tokenizer=None,
) -> Path:
    """Write a tiny random model to `tmp_dir`; return the dir. Its vocabulary is `tokenizer`'s
    (default: SmolLM2's, from the embedded model)."""
    from transformers import AutoModelForCausalLM as AutoModel

    directory = Path(tmp_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = load_tokenizer(None, cache_dir=tokenizer_cache_dir)
    config = _tiny_config(arch, len(tokenizer), layer_types, sliding_window,
                          tokenizer.bos_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModel.from_config(config, dtype=torch.float32)
    # HF's default init (std 0.02) makes every logit nearly equal and greedy ties common; a wider
    # spread gives decisive argmaxes, so exactness tests compare real decisions.
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, (0.5 if arch != "gemma3" else 0.1) if "embed" in name
                                  else 1.0 / parameter.shape[1] ** 0.5)
            elif arch == "gemma3" and "norm" in name:  # Gemma scales by 1 + w from w = 0: vary w
                parameter.normal_(0.0, 0.3)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory
