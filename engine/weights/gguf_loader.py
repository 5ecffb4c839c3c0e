"""Load a GGUF file as float tensors with Hugging Face names (Llama family and Gemma 3)."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from engine.model.config import ModelConfig, model_config_from_gguf
from engine.weights.dequantize import dequantize
from engine.weights.gguf_file import GgufFile

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 3's four norms per layer; llama.cpp's "ffn_norm" is Gemma's pre-feed-forward norm.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
LAYER_NAMES_BY_ARCHITECTURE = {"gemma3": _GEMMA3_LAYER_NAMES}
# llama.cpp's Gemma converters store every RMSNorm weight as (1 + w); HF keeps w and adds 1 at run time.
NORM_PLUS_ONE_ARCHITECTURES = {"gemma3"}
_LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Tensors llama.cpp stores for its own convenience that the config already describes.
_IGNORED_NAMES = {"rope_freqs.weight"}
# llama.cpp's converter permutes Q/K rows (interleaved RoPE) only for its "llama" architecture.
PERMUTED_QK_ARCHITECTURES = {"llama"}


def hf_name(gguf_name: str, architecture: str = "llama") -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    names = LAYER_NAMES_BY_ARCHITECTURE.get(architecture, _LAYER_NAMES)
    match = _LAYER_PATTERN.fullmatch(gguf_name)
    if match is None or match.group(2) not in names:
        raise ValueError(f"unknown GGUF tensor {gguf_name!r}")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{names[part]}.{kind}"


def unpermute_rows(tensor: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head it interleaves the two RoPE halves."""
    rows = tensor.shape[0]
    rest = tensor.shape[1:]
    return (tensor.reshape(num_heads, rows // num_heads // 2, 2, *rest)
            .swapaxes(1, 2).reshape(rows, *rest))


def load_gguf(path: Path, dtype: torch.dtype, show_progress: bool = True) -> tuple[ModelConfig, dict]:
    gguf = GgufFile(path)
    config = model_config_from_gguf(gguf.metadata, gguf.tensors.keys())
    architecture = gguf.metadata["general.architecture"]
    is_permuted = architecture in PERMUTED_QK_ARCHITECTURES
    norm_plus_one = architecture in NORM_PLUS_ONE_ARCHITECTURES
    heads_by_part = {"attn_q": config.num_heads, "attn_k": config.num_kv_heads}
    weights: dict[str, torch.Tensor] = {}
    names = [name for name in gguf.tensors if name not in _IGNORED_NAMES]
    for name in tqdm(names, desc=f"Dequantizing {path.name}", unit="tensor", disable=not show_progress):
        info = gguf.tensors[name]
        tensor = dequantize(gguf.raw(name), info.quant_type, info.shape)
        match = _LAYER_PATTERN.fullmatch(name)
        if is_permuted and match is not None and match.group(2) in heads_by_part:
            tensor = unpermute_rows(tensor, heads_by_part[match.group(2)])
        if norm_plus_one and name.endswith("norm.weight"):
            tensor = tensor - 1  # in fp32, as transformers' Gemma2TensorProcessor does
        weights[hf_name(name, architecture)] = tensor.to(dtype).contiguous()
    return config, weights
