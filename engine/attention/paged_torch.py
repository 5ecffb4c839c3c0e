"""Attention over the `paged` KV layout (memory/kv/paged.py) in pure torch: K/V are written through
the block table, and each read gathers the pages a query needs into a dense run (a prefill chunk that
starts a sequence attends to its own new K/V instead), then attends with the same
scaled_dot_product_attention calls (and masks) as the contiguous backend. The native paged
backend (paged_native.py) overrides the store and the decode read."""

from __future__ import annotations

import dataclasses

import torch

from engine.attention.base import AttentionBackend, LayerAttentionSpec
from engine.attention.torch_sdpa import TorchSdpaBackend
from engine.core.forward_batch import ForwardBatch
from memory.kv.paged import PagedLayerCache


def gather_pages(cache: PagedLayerCache, table_rows: torch.Tensor, length: int) -> torch.Tensor:
    """[rows, length, kv_heads, head_dim]: the first `length` tokens of each table row, as one copy."""
    num_pages = -(-length // cache.tokens_per_page)
    # index_select on the flattened page indices: ~3.5x faster than indexing with the 2-D table slice
    pages = cache.pages.index_select(0, table_rows[:, :num_pages].reshape(-1))
    return pages.view(table_rows.shape[0], num_pages * cache.tokens_per_page, *cache.pages.shape[2:])[:, :length]


class PagedTorchBackend(AttentionBackend):
    def __init__(self, dense: TorchSdpaBackend | None = None):
        self.dense = dense or TorchSdpaBackend()  # what attends once the pages are gathered

    def forward(self, spec: LayerAttentionSpec, q, k, v, key_cache: PagedLayerCache, value_cache: PagedLayerCache,
                batch: ForwardBatch, out) -> None:
        self._store(key_cache, batch, k)
        self._store(value_cache, batch, v)
        num_decode = batch.num_decode_tokens
        if num_decode:
            self._decode(spec, q[:num_decode], key_cache, value_cache, batch, out[:num_decode])
        if batch.prefills:
            self._prefills(spec, q, k, v, key_cache, value_cache, batch, out)

    def _prefills(self, spec: LayerAttentionSpec, q, k, v, key_cache: PagedLayerCache, value_cache: PagedLayerCache,
                  batch: ForwardBatch, out) -> None:
        """Every prompt chunk's attention: a chunk starting at position 0 attends to its own K/V (`k`, `v`),
        a later one to its slot's pages gathered through the block table; SDPA either way."""
        for chunk in batch.prefills:
            rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
            if chunk.start_position == 0 and k.dtype == key_cache.pages.dtype:  # the chunk's own K/V: no gather
                keys, values = k[rows].unsqueeze(0), v[rows].unsqueeze(0)
            else:
                row = key_cache.block_table[chunk.slot : chunk.slot + 1]
                keys = gather_pages(key_cache, row, chunk.start_position + chunk.num_tokens)
                values = gather_pages(value_cache, row, chunk.start_position + chunk.num_tokens)
            self.dense._prefill(spec, q[rows], keys, values, 0, chunk.start_position, out[rows])

    def _store(self, cache: PagedLayerCache, batch: ForwardBatch, values) -> None:
        page_tokens = cache.tokens_per_page
        pages = cache.block_table[batch.token_slots, batch.positions // page_tokens]
        cache.pages[pages, batch.positions % page_tokens] = values

    def _decode(self, spec: LayerAttentionSpec, q, key_cache: PagedLayerCache, value_cache: PagedLayerCache,
                batch: ForwardBatch, out) -> None:
        length = batch.max_decode_context_len
        rows = key_cache.block_table[batch.decode_slots]
        keys = gather_pages(key_cache, rows, length)
        values = gather_pages(value_cache, rows, length)
        dense = dataclasses.replace(batch, decode_slots_are_prefix=True,
                                    decode_slots=torch.arange(q.shape[0], device=q.device))
        self.dense._decode(spec, q, keys, values, dense, out)
