"""Attention backends: one object per variant, chosen by name.

A backend writes the step's new K/V into the layer's cache tensors and computes attention for every
token of the step. Cache tensors are `[max_slots, max_len, kv_heads, head_dim]` views over virtual
memory (the `contiguous` KV layout): decode reads them in place through a strided slice.
"""

from __future__ import annotations

from collections.abc import Callable

from engine.attention.base import AttentionBackend, LayerAttentionSpec
from engine.attention.torch_sdpa import TorchSdpaBackend

_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchSdpaBackend}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _BACKENDS[name] = factory


def create_attention_backend(name: str = "torch") -> AttentionBackend:
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}") from None


__all__ = ["AttentionBackend", "LayerAttentionSpec", "create_attention_backend", "register_attention_backend"]
