"""Attention with a native decode kernel: decode reads each slot's K/V in place (any slots, no
gather, K and V read once per key/value head); prefill chunks use scaled_dot_product_attention."""

from __future__ import annotations

import torch

from engine.attention.base import LayerAttentionSpec
from engine.attention.native import load_decode_kernels
from engine.attention.torch_sdpa import TorchSdpaBackend

_KERNELS = {torch.float32: "decode_attention_f32", torch.bfloat16: "decode_attention_bf16"}


class NativeDecodeBackend(TorchSdpaBackend):
    def __init__(self):
        self._library = load_decode_kernels()

    def _store(self, cache, batch, values) -> None:
        # one memcpy per token row where each token's heads are contiguous in the cache and in `values`
        if not (cache.device.type == values.device.type == "cpu" and cache.dtype == values.dtype
                and cache.stride(-1) == values.stride(-1) == 1 and cache.stride(2) == values.stride(1) == cache.shape[3]
                and batch.token_slots.dtype == batch.positions.dtype == torch.int64
                and batch.token_slots.is_contiguous() and batch.positions.is_contiguous()):
            return super()._store(cache, batch, values)
        size = cache.element_size()
        bad = self._library.store_rows(cache.data_ptr(), cache.shape[0], cache.stride(0) * size, cache.shape[1],
                                       cache.stride(1) * size, batch.token_slots.data_ptr(), batch.positions.data_ptr(),
                                       values.shape[0], values.data_ptr(), values.stride(0) * size,
                                       cache.shape[2] * cache.shape[3] * size)
        if bad:
            raise IndexError(f"KV row {bad - 1}: slot {int(batch.token_slots[bad - 1])} position "
                             f"{int(batch.positions[bad - 1])} outside the cache {tuple(cache.shape[:2])}")

    def _decode(self, spec: LayerAttentionSpec, q, key_cache, value_cache, batch, out) -> None:
        if key_cache.dtype not in _KERNELS or key_cache.device.type != "cpu":
            return super()._decode(spec, q, key_cache, value_cache, batch, out)
        query = q.float().contiguous()
        result = out if out.dtype == torch.float32 and out.is_contiguous() else torch.empty_like(query)
        getattr(self._library, _KERNELS[key_cache.dtype])(
            query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(),
            key_cache.stride(0), key_cache.stride(1),
            batch.decode_slots.data_ptr(), batch.decode_context_lens.data_ptr(),
            q.shape[0], spec.num_heads, spec.num_kv_heads, spec.head_dim,
            spec.sliding_window or 0, spec.head_dim ** -0.5,
            result.data_ptr(), torch.get_num_threads(),
        )
        if result is not out:
            out.copy_(result)
