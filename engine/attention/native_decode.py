"""Attention with the native kernels: decode reads each slot's K/V in place (any slots, no gather, K and V
read once per key/value head); prompt chunks all in one call of a prefill kernel where the cache's dtype has
one here: bf16 on an AVX512-BF16 CPU (csrc/prefill_attention.c; 3.4-4.1x SDPA's speed on SmolLM2's 128-token
chunks), fp32 on an AVX2/FMA CPU (csrc/prefill_attention_f32.c; docs/SPEED.md); other prompt chunks use
scaled_dot_product_attention."""

from __future__ import annotations

from engine.attention.base import LayerAttentionSpec
from engine.attention.native import (
    can_store,
    decode_in_place,
    load_decode_kernels,
    load_prefill_kernels,
    prefill_in_place,
    rows_in_place,
    store_rows,
)
from engine.attention.torch_sdpa import TorchSdpaBackend


class NativeDecodeBackend(TorchSdpaBackend):
    def __init__(self):
        self._library = load_decode_kernels()
        self._prefill_kernels = load_prefill_kernels()

    def _store(self, cache, batch, values) -> None:
        # one memcpy per token row where each token's heads are contiguous in the cache and in `values`
        if not can_store(cache, values, batch.token_slots, batch.positions):
            return super()._store(cache, batch, values)
        store_rows(self._library, cache, None, batch.token_slots, batch.positions, values)

    def _decode(self, spec: LayerAttentionSpec, q, key_cache, value_cache, batch, out) -> None:
        if not rows_in_place(key_cache):
            return super()._decode(spec, q, key_cache, value_cache, batch, out)
        decode_in_place(self._library, spec, q, key_cache, value_cache, None, batch.decode_slots,
                      batch.decode_context_lens, out)

    def _prefills(self, spec: LayerAttentionSpec, q, key_cache, value_cache, batch, out) -> None:
        if not prefill_in_place(self._prefill_kernels, spec, q, key_cache, value_cache, None, batch, out):
            super()._prefills(spec, q, key_cache, value_cache, batch, out)
