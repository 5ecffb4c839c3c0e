"""Attention with the native kernels: decode reads each slot's K/V in place (any slots, no gather, K and V
read once per key/value head); prompt chunks, over a bf16 cache on an AVX512-BF16 CPU, all in one call of
the prefill kernel (csrc/prefill_attention.c; 3.4-4.1x SDPA's speed on SmolLM2's 128-token chunks,
docs/SPEED.md); other prompt chunks (fp32, where transformers' greedy tokens must be matched bit for bit, or
no AVX512-BF16) use scaled_dot_product_attention."""

from __future__ import annotations

from engine.attention.base import LayerAttentionSpec
from engine.attention.native import (
    can_store,
    decode_in_place,
    load_decode_kernels,
    load_prefill_kernel,
    prefill_in_place,
    rows_in_place,
    store_rows,
)
from engine.attention.torch_sdpa import TorchSdpaBackend


class NativeDecodeBackend(TorchSdpaBackend):
    def __init__(self):
        self._library = load_decode_kernels()
        self._prefill_library = load_prefill_kernel()

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
        if self._prefill_library is None or not prefill_in_place(self._prefill_library, spec, q, key_cache,
                                                                 value_cache, None, batch, out):
            super()._prefills(spec, q, key_cache, value_cache, batch, out)
