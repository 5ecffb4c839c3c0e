"""Attention over the `paged` KV layout (memory/kv/paged.py) in pure torch: K/V are written through
the block table, and each read gathers the pages a query needs into a dense run, then attends with
the same scaled_dot_product_attention calls (and masks) as the contiguous backend."""

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
    pages = cache.pages[table_rows[:, :num_pages]]  # [rows, num_pages, page_tokens, kvh, d]
    return pages.flatten(1, 2)[:, :length]


class PagedTorchBackend(AttentionBackend):
    def __init__(self, dense: TorchSdpaBackend | None = None):
        self.dense = dense or TorchSdpaBackend()  # what attends once the pages are gathered

    def forward(self, spec: LayerAttentionSpec, q, k, v, key_cache: PagedLayerCache, value_cache: PagedLayerCache,
                batch: ForwardBatch, out) -> None:
        table = key_cache.block_table
        page_tokens = key_cache.tokens_per_page
        pages = table[batch.token_slots, batch.positions // page_tokens]
        offsets = batch.positions % page_tokens
        key_cache.pages[pages, offsets] = k
        value_cache.pages[pages, offsets] = v
        num_decode = batch.num_decode_tokens
        if num_decode:
            length = batch.max_decode_context_len
            rows = table[batch.decode_slots]
            keys = gather_pages(key_cache, rows, length)
            values = gather_pages(value_cache, rows, length)
            dense = dataclasses.replace(batch, decode_slots_are_prefix=True,
                                        decode_slots=torch.arange(num_decode, device=q.device))
            self.dense._decode(spec, q[:num_decode], keys, values, dense, out[:num_decode])
        for chunk in batch.prefills:
            rows = slice(chunk.token_offset, chunk.token_offset + chunk.num_tokens)
            end = chunk.start_position + chunk.num_tokens
            row = table[chunk.slot : chunk.slot + 1]
            keys = gather_pages(key_cache, row, end)
            values = gather_pages(value_cache, row, end)
            self.dense._prefill(spec, q[rows], keys, values, 0, chunk.start_position, out[rows])
