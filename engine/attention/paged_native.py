"""Attention over the `paged` KV layout with the native kernels (csrc/decode_attention.c): K/V rows are
written through the block table one memcpy per row, and decode reads every sequence's pages in place
through its table row (row address pages[table[slot, t / P]] + (t % P) * row), with no gather: the same
kernel, summation order and results as the contiguous layout's. Prefill chunks gather their slot's pages
and attend with SDPA, as in the torch paged backend: a chunk's attention does ~chunk-size times more work
per KV byte than the gather copies (docs/JENGA.md measures the difference)."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, LayerAttentionSpec
from engine.attention.native import can_store, decode_in_place, prefill_in_place, rows_in_place, store_rows
from engine.attention.native_decode import NativeDecodeBackend
from engine.attention.paged_torch import PagedTorchBackend
from engine.core.forward_batch import ForwardBatch
from memory.kv.paged import PagedLayerCache


def _tables_ok(table) -> bool:
    return table.dtype == torch.int64 and table.is_contiguous() and table.device.type == "cpu"


class PagedNativeBackend(PagedTorchBackend):
    def __init__(self, dense: NativeDecodeBackend):
        super().__init__(dense)
        self._library = dense._library
        self._prefill_kernels = dense._prefill_kernels

    def _store(self, cache: PagedLayerCache, batch: ForwardBatch, values) -> None:
        if can_store(cache.pages, values, batch.token_slots, batch.positions) and _tables_ok(cache.block_table):
            store_rows(self._library, cache.pages, cache.block_table, batch.token_slots, batch.positions, values)
        else:
            super()._store(cache, batch, values)

    def _decode(self, spec: LayerAttentionSpec, q, key_cache: PagedLayerCache, value_cache: PagedLayerCache,
                batch: ForwardBatch, out) -> None:
        if (rows_in_place(key_cache.pages) and key_cache.pages.stride() == value_cache.pages.stride()
                and _tables_ok(key_cache.block_table)):
            decode_in_place(self._library, spec, q, key_cache.pages, value_cache.pages, key_cache.block_table,
                          batch.decode_slots, batch.decode_context_lens, out)
        else:
            super()._decode(spec, q, key_cache, value_cache, batch, out)

    def _prefills(self, spec: LayerAttentionSpec, q, k, v, key_cache: PagedLayerCache, value_cache: PagedLayerCache,
                  batch: ForwardBatch, out) -> None:
        if (not _tables_ok(key_cache.block_table)
                or not prefill_in_place(self._prefill_kernels, spec, q, key_cache.pages, value_cache.pages,
                                        key_cache.block_table, batch, out)):
            super()._prefills(spec, q, k, v, key_cache, value_cache, batch, out)


def paged_backend(dense: AttentionBackend) -> AttentionBackend:
    """The paged layout's attention around the contiguous layout's backend `dense`: in place with the native
    kernels when `dense` is the native backend, else gather through the block table and run `dense`."""
    if isinstance(dense, NativeDecodeBackend):
        return PagedNativeBackend(dense)
    return PagedTorchBackend(dense)
