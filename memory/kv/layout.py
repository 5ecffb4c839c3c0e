"""`KVLayout`: where a KV cache's pages sit in virtual memory, the strategy KVCacheManager delegates to.

The manager decides which blocks exist, which slot a request owns and which token pages of it are
resident; a layout only places those blocks (maps their pool chunks) and moves bytes. So two layouts given
the same calls make the same decisions (tests/loadtest/sim compares `contiguous` with the simulator's
`bookkeeping`). Layouts are looked up by name in memory/kv/registry.py: `contiguous`
(memory/kv/contiguous.py) and `paged` (memory/kv/paged.py).

Contract, for a block of layer group g (its chunks: for each layer of g in order, K then V):
  - `map_block(slot, page, block)` maps every chunk of the block at token page `page` of `slot`; the place
    must be unmapped. `unmap_block` unmaps them (the chunks stay the block's). `move_block` remaps a block
    from one slot to another at the same page, copying no data (the destination must be unmapped).
  - `block_pages(slot, page, block)`: uint8 views of a mapped block's chunks; through them
    `copy_block_to_host` / `copy_block_from_host` copy the block to / from host-buffer slots (one host slot
    per chunk, in chunk order); `release_host` frees host slots.
  - `copy_block(src_slot, dst_slot, page, src, dst)` copies the bytes of block `src`, mapped at `page` of
    `src_slot`, into block `dst`, mapped at the same page of `dst_slot` (a forked request's private copy of
    its parent's last partial page).
  - `block_freed(block)`: the block's chunks went back to the pool (a recording layout logs it);
    `host_allocated(host_slots)`: slots were taken for offloaded layers' pages (likewise).
  - Layer-wise offloading (`contiguous` only): `map_layer_page` / `unmap_layer_page` / `layer_page_views` for
    one layer's page (staging maps its chunks there for a step), and `layer_page_to_host`,
    `layer_page_from_host`, `swap_layer_page` to move one layer's page between tiers (logged for the ranks).
  - `read_tokens(slot, start, end)` returns copies of the slot's K and V for tokens [start, end) per layer;
    `write_tokens(slot, start, layers)` writes such copies back (the pages must be mapped).
  - `layer_caches()`: per layer, the (K, V) tensors attention reads and writes in place.
  - `close()` releases the layout's virtual ranges; every block must be unmapped first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch

from memory.host_buffer import HostBuffer
from memory.kv.blocks import KVBlock
from memory.kv.spec import KVCacheSpec
from memory.vmm.base import VmmBackend

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V


class KVLayout(ABC):
    name: ClassVar[str]
    # True: blocks are small pages of Jenga's LCM allocator (memory/kv/block_source.py LcmBlocks), as the
    # `paged` layout places them; False: a block is loose pool chunks (`contiguous`)
    small_pages: ClassVar[bool] = False

    @abstractmethod
    def __init__(self, spec: KVCacheSpec, backend: VmmBackend, dtype: torch.dtype) -> None: ...

    @abstractmethod
    def layer_caches(self) -> list[tuple]:
        """Per layer, what attention reads: (K, V) tensors, or (K, V) paged caches with block tables."""

    @abstractmethod
    def map_block(self, slot: int, page: int, block: KVBlock) -> None: ...

    @abstractmethod
    def unmap_block(self, slot: int, page: int, block: KVBlock) -> None: ...

    @abstractmethod
    def move_block(self, block: KVBlock, src_slot: int, dst_slot: int, page: int) -> None: ...

    @abstractmethod
    def block_pages(self, slot: int, page: int, block: KVBlock) -> list[torch.Tensor]:
        """uint8 views of a mapped block's chunks, in the block's chunk order."""

    def copy_block_to_host(self, slot: int, page: int, block: KVBlock, host_buffer: HostBuffer,
                           host_slots: list[int]) -> None:
        for host_slot, view in zip(host_slots, self.block_pages(slot, page, block), strict=True):
            host_buffer.copy_in(host_slot, view)

    def copy_block_from_host(self, slot: int, page: int, block: KVBlock, host_buffer: HostBuffer,
                             host_slots: list[int]) -> None:
        for host_slot, view in zip(host_slots, self.block_pages(slot, page, block), strict=True):
            host_buffer.copy_out(host_slot, view)

    def release_host(self, host_buffer: HostBuffer, host_slots: list[int]) -> None:
        host_buffer.free(host_slots)

    def copy_block(self, src_slot: int, dst_slot: int, page: int, src: KVBlock, dst: KVBlock) -> None:
        for source, target in zip(self.block_pages(src_slot, page, src), self.block_pages(dst_slot, page, dst),
                                  strict=True):
            target.copy_(source)

    def block_freed(self, block: KVBlock) -> None:  # noqa: B027 - most layouts keep no state per block
        """The block's chunks went back to the pool (RecordingLayout logs it for the other ranks)."""

    def host_allocated(self, host_slots: list[int]) -> None:  # noqa: B027 - most layouts keep no state
        """Host-buffer slots were taken for pages of layers living on the host (RecordingLayout logs it, so
        that the other ranks take the same slots for their heads)."""

    # one layer's page changing tier (demotion, promotion), for layouts with map_layer_page / unmap_layer_page /
    # layer_page_views (`contiguous`); `block` is the page's block, which a recording layout names in its log
    # (memory/kv/mirror.py), and whose chunk list the caller updates
    def layer_page_to_host(self, block: KVBlock, layer: int, slot: int, page: int, host_buffer: HostBuffer,
                           host: tuple[int, int]) -> tuple:
        """Copies one layer's K and V page of a slot into host slots `host` (K, V) and unmaps it; returns
        the two chunks that were there."""
        for host_slot, view in zip(host, self.layer_page_views(layer, slot, page), strict=True):
            host_buffer.copy_in(host_slot, view)
        return self.unmap_layer_page(layer, slot, page)

    def layer_page_from_host(self, block: KVBlock, layer: int, slot: int, page: int, chunks: tuple,
                             host_buffer: HostBuffer, host: tuple[int, int]) -> None:
        """Maps `chunks` (K, V) at one layer's page of a slot and copies host slots `host` into them."""
        self.map_layer_page(layer, slot, page, *chunks)
        for host_slot, view in zip(host, self.layer_page_views(layer, slot, page), strict=True):
            host_buffer.copy_out(host_slot, view)

    def swap_layer_page(self, block: KVBlock, layer: int, slot: int, page: int, chunks: tuple) -> tuple:
        """Puts `chunks` (K, V) in place of one layer's mapped page, data carried over; returns the old two."""
        data = [view.clone() for view in self.layer_page_views(layer, slot, page)]
        old = self.unmap_layer_page(layer, slot, page)
        self.map_layer_page(layer, slot, page, *chunks)
        for view, saved in zip(self.layer_page_views(layer, slot, page), data, strict=True):
            view.copy_(saved)
        return old

    @abstractmethod
    def read_tokens(self, slot: int, start: int, end: int) -> KVLayers: ...

    @abstractmethod
    def write_tokens(self, slot: int, start: int, layers: KVLayers) -> None: ...

    @abstractmethod
    def close(self) -> None: ...
