"""Attention with PyTorch's scaled_dot_product_attention over the in-place cache views.

Decode: one call for the whole batch over `cache[:num_slots, :max_len]` (a strided view, no gather),
with a per-slot length mask. Prefill: one call per chunk against its slot's range.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from engine.attention.base import AttentionBackend, LayerAttentionSpec
from engine.core.forward_batch import ForwardBatch


def store_kv(cache: torch.Tensor, batch: ForwardBatch, values: torch.Tensor) -> None:
    """cache[token_slots, positions] = values. Where a slot's rows follow one another in memory (the
    contiguous layout) as one index_copy_ over the flattened [slots * len] rows: the two-index
    index_put it replaces measured ~1 ms per call inside decode steps at batch 64 (bf16, 2 threads)."""
    if cache.stride(0) == cache.shape[1] * cache.stride(1):
        rows = cache.flatten(0, 1)
        rows.index_copy_(0, batch.token_slots * cache.shape[1] + batch.positions, values)
    else:
        cache[batch.token_slots, batch.positions] = values


# On CUDA, cuDNN's attention builds an execution plan for every new shape: ~1 ms of host time per call (torch
# 2.11, H200, 2026-12-04: 93 of 191 ms of CPU in three decode steps of a 30-layer model). A decode step's key
# length grows by one every step, so every layer of every step would pay it. The other three backends do not.
_CUDA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, **kwargs) -> torch.Tensor:
    """F.scaled_dot_product_attention, without the cuDNN backend on CUDA."""
    if query.is_cuda:
        with sdpa_kernel(_CUDA_BACKENDS):
            return F.scaled_dot_product_attention(query, keys, values, **kwargs)
    return F.scaled_dot_product_attention(query, keys, values, **kwargs)


class TorchSdpaBackend(AttentionBackend):
    def forward(self, spec, q, k, v, key_cache, value_cache, batch: ForwardBatch, out) -> None:
        self._store(key_cache, batch, k)
        self._store(value_cache, batch, v)
        num_decode = batch.num_decode_tokens
        if num_decode:
            self._decode(spec, q[:num_decode], key_cache, value_cache, batch, out[:num_decode])
        if batch.prefills:
            self._prefills(spec, q, key_cache, value_cache, batch, out)

    def _prefills(self, spec: LayerAttentionSpec, q, key_cache, value_cache, batch: ForwardBatch, out) -> None:
        """Every prompt chunk's attention (its K/V already stored): one SDPA call per chunk."""
        for chunk in batch.prefills:
            rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
            self._prefill(spec, q[rows], key_cache, value_cache, chunk.slot, chunk.start_position, out[rows])

    def _store(self, cache: torch.Tensor, batch: ForwardBatch, values: torch.Tensor) -> None:
        store_kv(cache, batch, values)

    def _decode(self, spec: LayerAttentionSpec, q, key_cache, value_cache, batch, out) -> None:
        length = batch.max_decode_context_len
        lens = batch.decode_context_lens
        if batch.decode_slots_are_prefix:
            keys = key_cache[: q.shape[0], :length]
            values = value_cache[: q.shape[0], :length]
        else:  # a gather: only when a prefilling request sits between decoding slots
            keys = key_cache[batch.decode_slots, :length]
            values = value_cache[batch.decode_slots, :length]
        positions = torch.arange(length, device=q.device)
        allowed = positions[None, :] < lens[:, None]
        if spec.sliding_window is not None:
            allowed &= positions[None, :] >= (lens - spec.sliding_window)[:, None]
        attended = sdpa(
            q.unsqueeze(2),  # [B, H, 1, D]
            keys.transpose(1, 2),  # [B, kvH, L, D] strided
            values.transpose(1, 2),
            attn_mask=allowed[:, None, None, :],
            enable_gqa=spec.num_heads != spec.num_kv_heads,
        )
        out.copy_(attended.squeeze(2))

    def _prefill(self, spec: LayerAttentionSpec, q, key_cache, value_cache, slot, start, out) -> None:
        num_new = q.shape[0]
        end = start + num_new
        keys = key_cache[slot, :end].transpose(0, 1).unsqueeze(0)  # [1, kvH, end, D]
        values = value_cache[slot, :end].transpose(0, 1).unsqueeze(0)
        query = q.transpose(0, 1).unsqueeze(0)  # [1, H, n, D]
        gqa = spec.num_heads != spec.num_kv_heads
        if start == 0 and spec.sliding_window is None:
            attended = sdpa(query, keys, values, is_causal=True, enable_gqa=gqa)
        else:
            query_pos = torch.arange(start, end, device=q.device)[:, None]
            key_pos = torch.arange(end, device=q.device)[None, :]
            allowed = key_pos <= query_pos
            if spec.sliding_window is not None:
                allowed &= key_pos > query_pos - spec.sliding_window
            attended = sdpa(query, keys, values, attn_mask=allowed, enable_gqa=gqa)
        out.copy_(attended.squeeze(0).transpose(0, 1))
