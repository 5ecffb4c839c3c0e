"""Attention backends: one object per variant, chosen by name.

A backend writes the step's new K/V into the layer's cache tensors and computes attention for every
token of the step. Cache tensors are `[max_slots, max_len, kv_heads, head_dim]` views over virtual
memory (the `contiguous` KV layout): decode reads them in place through a strided slice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.attention.base import AttentionBackend, LayerAttentionSpec
from engine.attention.torch_sdpa import TorchSdpaBackend

logger = logging.getLogger(__name__)

def _native() -> AttentionBackend:
    from engine.attention.native_decode import NativeDecodeBackend

    return NativeDecodeBackend()


def _auto() -> AttentionBackend:
    """The native decode kernel where it builds (a C compiler is there), else pure torch."""
    try:
        return _native()
    except (RuntimeError, OSError) as error:
        logger.warning("native decode attention unavailable (%s); using torch sdpa", error)
        return TorchSdpaBackend()


_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchSdpaBackend, "native": _native, "auto": _auto}


def register_attention_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _BACKENDS[name] = factory


def create_attention_backend(name: str = "auto") -> AttentionBackend:
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_BACKENDS)}") from None


__all__ = ["AttentionBackend", "LayerAttentionSpec", "create_attention_backend", "register_attention_backend"]
