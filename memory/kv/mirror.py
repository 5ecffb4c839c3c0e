"""Keeping tensor-parallel ranks' KV layouts identical.

Rank 0 decides everything (slots, pages, sharing, swaps); its layout is wrapped in a
`RecordingLayout` that appends each layout call, by block id, to a log. Rank 0 broadcasts the log
with the step's plan and every other rank replays it with `LayoutMirror` on its own pool, so each
rank's KV cache has the same pages at the same virtual places for its own shard of heads.
"""

from __future__ import annotations

import torch

from memory.kv.blocks import KVBlock
from memory.kv.layouts import LAYOUTS
from memory.kv.spec import KVCacheSpec

KV_CLIENT = "kv"


class RecordingLayout:
    """A layout that also logs every call another rank needs to replay (a decorator, not a subclass)."""

    def __init__(self, layout, log: list):
        self._layout = layout
        self._log = log

    def __getattr__(self, name):  # reads (layer_caches, block_pages, ...) go straight through
        return getattr(self._layout, name)

    def map_block(self, slot: int, page: int, block: KVBlock) -> None:
        self._layout.map_block(slot, page, block)
        self._log.append(("map", block.block_id, block.group, slot, page))

    def unmap_block(self, slot: int, page: int, block: KVBlock) -> None:
        self._layout.unmap_block(slot, page, block)
        self._log.append(("unmap", block.block_id, slot, page))

    def move_block(self, block: KVBlock, src_slot: int, dst_slot: int, page: int) -> None:
        self._layout.move_block(block, src_slot, dst_slot, page)
        self._log.append(("move", block.block_id, src_slot, dst_slot, page))

    def copy_block_to_host(self, slot, page, block, host_buffer, host_slots) -> None:
        self._layout.copy_block_to_host(slot, page, block, host_buffer, host_slots)
        self._log.append(("to_host", block.block_id, slot, page, tuple(host_slots)))

    def copy_block_from_host(self, slot, page, block, host_buffer, host_slots) -> None:
        self._layout.copy_block_from_host(slot, page, block, host_buffer, host_slots)
        self._log.append(("from_host", block.block_id, slot, page, tuple(host_slots)))

    def release_host(self, host_buffer, host_slots: list[int]) -> None:
        self._layout.release_host(host_buffer, host_slots)
        self._log.append(("release_host", tuple(host_slots)))

    def block_freed(self, block: KVBlock) -> None:
        self._log.append(("free", block.block_id))


class LayoutMirror:
    """Replays rank 0's layout log on this rank's pool and virtual tensors."""

    def __init__(self, spec: KVCacheSpec, pool, dtype: torch.dtype, host_buffer=None, layout: str = "contiguous"):
        self.spec = spec
        self.pool = pool
        self.host_buffer = host_buffer
        self.layout = LAYOUTS[layout](spec, pool.backend, dtype)
        self.blocks: dict[int, KVBlock] = {}
        pool.register(KV_CLIENT)

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.layout.layer_caches()

    def apply(self, log: list[tuple]) -> None:
        for entry in log:
            getattr(self, "_" + entry[0])(*entry[1:])

    def _block(self, block_id: int, group: int) -> KVBlock:
        block = self.blocks.get(block_id)
        if block is None:
            num_chunks = 2 * len(self.spec.groups[group].layers)
            block = KVBlock(block_id, group, self.pool.inflate(KV_CLIENT, num_chunks), ref_count=1)
            self.blocks[block_id] = block
        return block

    def _map(self, block_id: int, group: int, slot: int, page: int) -> None:
        self.layout.map_block(slot, page, self._block(block_id, group))

    def _unmap(self, block_id: int, slot: int, page: int) -> None:
        self.layout.unmap_block(slot, page, self.blocks[block_id])

    def _move(self, block_id: int, src_slot: int, dst_slot: int, page: int) -> None:
        self.layout.move_block(self.blocks[block_id], src_slot, dst_slot, page)

    def _to_host(self, block_id: int, slot: int, page: int, host_slots: tuple[int, ...]) -> None:
        allocated = self.host_buffer.allocate(len(host_slots))
        if tuple(allocated) != tuple(host_slots):
            raise RuntimeError(f"host buffer diverged from rank 0: {allocated} != {host_slots}")
        self.layout.copy_block_to_host(slot, page, self.blocks[block_id], self.host_buffer, list(host_slots))

    def _from_host(self, block_id: int, slot: int, page: int, host_slots: tuple[int, ...]) -> None:
        self.layout.copy_block_from_host(slot, page, self.blocks[block_id], self.host_buffer, list(host_slots))

    def _release_host(self, host_slots: tuple[int, ...]) -> None:
        self.host_buffer.free(list(host_slots))

    def _free(self, block_id: int) -> None:
        block = self.blocks.pop(block_id)
        self.pool.deflate(KV_CLIENT, block.chunks)

    def close(self) -> None:
        self.layout.close()
        for block in self.blocks.values():
            self.pool.deflate(KV_CLIENT, block.chunks)
        self.blocks.clear()
