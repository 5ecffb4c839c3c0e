"""The `paged` KV layout (block tables, as in vLLM's PagedAttention), behind the same layout calls as
`contiguous`.

Per layer, K and V are virtual tensors `[num_pages, tokens_per_page, kv_heads, head_dim]` addressed
by *page index*: a block's chunks are mapped once, at the page index the layout gives it when it is
first mapped, however many requests share it. Each layer group has a block table
`[max_slots, pages_per_slot]` (int64) saying which page index holds page `p` of slot `s`; attention
reads K/V through it (engine/attention/paged_native.py in place, paged_torch.py by gathering). Page
index 0 is never mapped: table entries of pages a request does not hold (not yet grown, or slid out of
a window) point there, and it reads as zeros, so gathered padding is finite and masked like the
contiguous layout's holes.

Compared with `contiguous`: sharing a prefix block maps it once (not once per slot), moving a request
to another slot rewrites one table row (no remapping), and the virtual range is sized by pages, not
by max_slots x max_len; the price is a table lookup per page when attention reads (or, without the native
kernels and for prefill chunks over cached pages, a gather).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from memory.kv.blocks import KVBlock
from memory.kv.layout import KVLayout
from memory.kv.spec import KVCacheSpec
from memory.virtual_tensor import VirtualTensor
from memory.vmm.base import VmmBackend

NULL_PAGE = 0


@dataclass(frozen=True)
class PagedLayerCache:
    """What attention gets for one layer's K (or V) in the paged layout."""

    pages: torch.Tensor  # [num_pages, tokens_per_page, kv_heads, head_dim]
    block_table: torch.Tensor  # [max_slots, pages_per_slot] int64: page index per (slot, page)

    @property
    def tokens_per_page(self) -> int:
        return int(self.pages.shape[1])


class PagedLayout(KVLayout):
    name = "paged"
    small_pages = True

    def __init__(self, spec: KVCacheSpec, backend: VmmBackend, dtype: torch.dtype):
        self.spec = spec
        # Every (slot, page) of every slot may hold a distinct block at once, plus the null page.
        self.num_pages = spec.max_slots * spec.pages_per_slot + 1
        shape = (self.num_pages, spec.tokens_per_page, spec.num_kv_heads, spec.head_dim)
        self.tensors = [
            tuple(VirtualTensor(backend, shape, dtype, spec.page_bytes) for _ in "kv") for _ in range(spec.num_layers)
        ]
        self.tables = [torch.full((spec.max_slots, spec.pages_per_slot), NULL_PAGE, dtype=torch.int64)
                       for _ in spec.groups]  # the books, in host memory
        # what attention indexes with: the same tables where the pages are (one copy per step that changed them)
        self.device = backend.device
        self._device_tables = [t.to(self.device) for t in self.tables] if self.device.type == "cuda" else self.tables
        self._stale_groups: set[int] = set()
        self._group_of_layer = {layer: g for g, group in enumerate(spec.groups) for layer in group.layers}
        self._free_pages = list(range(NULL_PAGE + 1, self.num_pages))  # a heap: the lowest free index first
        self._page_of: dict[int, int] = {}  # block id -> page index while mapped
        self._mappings: dict[int, int] = {}  # block id -> (slot, page) entries pointing at it
        # layers whose pages this device keeps (all, unless a peer holds some layers' KV: KunServe); a block
        # has chunks only for these (KVCacheManager.hold_layers)
        self.held_layers = frozenset(range(spec.num_layers))

    def layer_caches(self) -> list[tuple[PagedLayerCache, PagedLayerCache]]:
        for group in self._stale_groups:
            self._device_tables[group].copy_(self.tables[group])
        self._stale_groups.clear()
        caches = []
        for layer, (k, v) in enumerate(self.tensors):
            table = self._device_tables[self._group_of_layer[layer]]
            caches.append((PagedLayerCache(k.tensor, table), PagedLayerCache(v.tensor, table)))
        return caches

    def _block_tensors(self, block: KVBlock) -> list[VirtualTensor]:
        layers = self.spec.groups[block.group].layers
        return [tensor for layer in layers if layer in self.held_layers for tensor in self.tensors[layer]]

    def page_index(self, block: KVBlock) -> int:
        return self._page_of[block.block_id]

    def map_block(self, slot: int, page: int, block: KVBlock) -> None:
        table = self.tables[block.group]
        if table[slot, page] != NULL_PAGE:
            raise ValueError(f"slot {slot} page {page} of group {block.group} is already mapped")
        index = self._page_of.get(block.block_id)
        if index is None:
            index = heapq.heappop(self._free_pages)
            for tensor, chunk in zip(self._block_tensors(block), block.chunks, strict=True):
                tensor.map_page(index, chunk)
            self._page_of[block.block_id] = index
        self._mappings[block.block_id] = self._mappings.get(block.block_id, 0) + 1
        table[slot, page] = index
        self._stale_groups.add(block.group)

    def unmap_block(self, slot: int, page: int, block: KVBlock) -> None:
        table = self.tables[block.group]
        index = self._page_of[block.block_id]
        if int(table[slot, page]) != index:
            raise ValueError(f"slot {slot} page {page} does not hold block {block.block_id}")
        table[slot, page] = NULL_PAGE
        self._mappings[block.block_id] -= 1
        self._stale_groups.add(block.group)
        if self._mappings[block.block_id] == 0:
            del self._mappings[block.block_id]
            del self._page_of[block.block_id]
            for tensor in self._block_tensors(block):
                tensor.unmap_page(index)
            heapq.heappush(self._free_pages, index)

    def move_block(self, block: KVBlock, src_slot: int, dst_slot: int, page: int) -> None:
        table = self.tables[block.group]
        table[dst_slot, page] = table[src_slot, page]
        table[src_slot, page] = NULL_PAGE
        self._stale_groups.add(block.group)

    def block_pages(self, slot: int, page: int, block: KVBlock) -> list[torch.Tensor]:
        index = self._page_of[block.block_id]
        return [tensor.page_tensor(index) for tensor in self._block_tensors(block)]

    def _token_rows(self, layer: int, slot: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(start, end)
        table = self.tables[self._group_of_layer[layer]]
        return table[slot, positions // self.spec.tokens_per_page], positions % self.spec.tokens_per_page

    def read_tokens(self, slot: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of a slot's tokens [start, end) of K and V, per layer (for migration); a layer held
        elsewhere (KunServe) has no pages here and reads as zeros."""
        out = []
        for layer, (k, v) in enumerate(self.tensors):
            pages, offsets = self._token_rows(layer, slot, start, end)
            if layer in self.held_layers:
                out.append((k.tensor[pages, offsets].clone(), v.tensor[pages, offsets].clone()))
            else:
                shape = (end - start, *k.tensor.shape[2:])
                out.append((k.tensor.new_zeros(shape), v.tensor.new_zeros(shape)))
        return out

    def write_tokens(self, slot: int, start: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Writes K and V of every held layer (a layer held elsewhere has no pages here to write)."""
        for layer, ((k, v), (key, value)) in enumerate(zip(self.tensors, layers, strict=True)):
            if layer not in self.held_layers:
                continue
            pages, offsets = self._token_rows(layer, slot, start, start + key.shape[0])
            k.tensor[pages, offsets] = key
            v.tensor[pages, offsets] = value

    def close(self) -> None:
        for k, v in self.tensors:
            k.close()
            v.close()
