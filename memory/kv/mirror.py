"""Keeping tensor-parallel ranks' KV layouts identical.

Rank 0 decides everything (slots, pages, sharing, swaps); its layout is wrapped in a
`RecordingLayout` that appends each layout call, by block id, to a log. Rank 0 broadcasts the log
with the step's plan and every other rank replays it with `LayoutMirror` on its own pool, so each
rank's KV cache has the same pages at the same virtual places for its own shard of heads.

Layer-wise offloading (LayerKV) rides the same log: a block's map entry says which of its chunks are pool
chunks, host-tier chunks (in place) or absent (the layer's page is in the host buffer); host-buffer slots taken
for offloaded pages, one layer's page moving between tiers (demotion, promotion) and each step's staging plan
(which host pages the step maps into which layer, `stage`: logged just before the step's broadcast) are entries
too, so every rank keeps its own heads' share of the same pages on the same tier and stages them the same way.
The staging maps themselves (`map_layer_page` during a step) are not logged: each rank's stager makes its own.

A cooperative pipeline (KunServe, engine/cooperative/follower.py) replays its leader's log the same way on
the follower, into the follower's own layout whose `held_layers` mask keeps pages only for the layers
the follower serves: a block there takes 2 chunks per held layer of its group.
"""

from __future__ import annotations

import torch

from memory.host_buffer import HostBuffer
from memory.kv.blocks import KVBlock
from memory.kv.host_tier import HOST_TIER, HostChunkTier
from memory.kv.layout import KVLayers, KVLayout
from memory.kv.registry import create_layout
from memory.kv.spec import KVCacheSpec

KV_CLIENT = "kv"


class RecordingLayout(KVLayout):
    """Wraps rank 0's layout: every call goes to it, and each one that changes where pages are mapped or
    what the host buffer holds is also logged for the other ranks to replay."""

    name = "recording"  # never registered: it wraps a layout the registry built

    def __init__(self, layout: KVLayout, log: list):
        self._layout = layout
        self._log = log

    def layer_caches(self) -> list[tuple]:
        return self._layout.layer_caches()

    @property
    def held_layers(self) -> frozenset[int]:
        return self._layout.held_layers

    @held_layers.setter
    def held_layers(self, layers: frozenset[int]) -> None:  # KVCacheManager.hold_layers (KunServe)
        self._layout.held_layers = layers

    def block_pages(self, slot: int, page: int, block: KVBlock) -> list[torch.Tensor]:
        return self._layout.block_pages(slot, page, block)

    def read_tokens(self, slot: int, start: int, end: int) -> KVLayers:
        return self._layout.read_tokens(slot, start, end)

    def write_tokens(self, slot: int, start: int, layers: KVLayers) -> None:
        self._layout.write_tokens(slot, start, layers)

    def close(self) -> None:
        self._layout.close()

    def map_block(self, slot: int, page: int, block: KVBlock) -> None:
        self._layout.map_block(slot, page, block)
        self._log.append(("map", block.block_id, block.group, slot, page, chunk_kinds(block.chunks)))

    def unmap_block(self, slot: int, page: int, block: KVBlock) -> None:
        self._layout.unmap_block(slot, page, block)
        self._log.append(("unmap", block.block_id, slot, page))

    def move_block(self, block: KVBlock, src_slot: int, dst_slot: int, page: int) -> None:
        self._layout.move_block(block, src_slot, dst_slot, page)
        self._log.append(("move", block.block_id, src_slot, dst_slot, page))

    def copy_block_to_host(self, slot: int, page: int, block: KVBlock, host_buffer: HostBuffer,
                           host_slots: list[int]) -> None:
        self._layout.copy_block_to_host(slot, page, block, host_buffer, host_slots)
        self._log.append(("to_host", block.block_id, slot, page, tuple(host_slots)))

    def copy_block_from_host(self, slot: int, page: int, block: KVBlock, host_buffer: HostBuffer,
                             host_slots: list[int]) -> None:
        self._layout.copy_block_from_host(slot, page, block, host_buffer, host_slots)
        self._log.append(("from_host", block.block_id, slot, page, tuple(host_slots)))

    def release_host(self, host_buffer: HostBuffer, host_slots: list[int]) -> None:
        self._layout.release_host(host_buffer, host_slots)
        self._log.append(("release_host", tuple(host_slots)))

    def copy_block(self, src_slot: int, dst_slot: int, page: int, src: KVBlock, dst: KVBlock) -> None:
        self._layout.copy_block(src_slot, dst_slot, page, src, dst)
        self._log.append(("copy", src_slot, dst_slot, page, src.block_id, dst.block_id))

    def block_freed(self, block: KVBlock) -> None:
        self._layout.block_freed(block)
        self._log.append(("free", block.block_id))

    def host_allocated(self, host_slots: list[int]) -> None:
        self._layout.host_allocated(host_slots)
        self._log.append(("host_alloc", tuple(host_slots)))

    # ---- one layer's page (layer-wise offloading) ----------------------------------------------
    def map_layer_page(self, layer: int, slot: int, page: int, key_chunk, value_chunk) -> None:
        self._layout.map_layer_page(layer, slot, page, key_chunk, value_chunk)  # staging: each rank its own

    def unmap_layer_page(self, layer: int, slot: int, page: int) -> tuple:
        return self._layout.unmap_layer_page(layer, slot, page)

    def layer_page_views(self, layer: int, slot: int, page: int) -> tuple:
        return self._layout.layer_page_views(layer, slot, page)

    def layer_page_to_host(self, block: KVBlock, layer: int, slot: int, page: int, host_buffer: HostBuffer,
                           host: tuple[int, int]) -> tuple:
        chunks = self._layout.layer_page_to_host(block, layer, slot, page, host_buffer, host)
        self._log.append(("layer_to_host", block.block_id, layer, slot, page, tuple(host)))
        return chunks

    def layer_page_from_host(self, block: KVBlock, layer: int, slot: int, page: int, chunks: tuple,
                             host_buffer: HostBuffer, host: tuple[int, int]) -> None:
        self._layout.layer_page_from_host(block, layer, slot, page, chunks, host_buffer, host)
        self._log.append(("layer_from_host", block.block_id, layer, slot, page, tuple(host)))

    def swap_layer_page(self, block: KVBlock, layer: int, slot: int, page: int, chunks: tuple) -> tuple:
        old = self._layout.swap_layer_page(block, layer, slot, page, chunks)
        self._log.append(("swap_layer", block.block_id, layer, slot, page, chunk_kinds(chunks)))
        return old


def chunk_kinds(chunks) -> str:
    """Per chunk: `p` a pool chunk, `t` a host-tier chunk (in place), `-` none (the page is in the host buffer)."""
    return "".join("-" if chunk is None else "t" if chunk.owner == HOST_TIER else "p" for chunk in chunks)


class LayoutMirror:
    """Replays rank 0's layout log on this rank's pool and virtual tensors."""

    def __init__(self, spec: KVCacheSpec, pool, dtype: torch.dtype, host_buffer=None, layout: str = "contiguous",
                 existing: KVLayout | None = None, host_tier: HostChunkTier | None = None):
        """`existing`: replay into this layout (a KV manager's, whose owner registered the pool's `kv` client)
        instead of building one; `close` then leaves the layout open. `host_tier`: where in-place offloaded
        pages come from (layer-wise offloading in place)."""
        self.spec = spec
        self.pool = pool
        self.host_buffer = host_buffer
        self.host_tier = host_tier
        self.staging_plan: list | None = None  # the next step's (a `stage` entry), taken by the runner
        self._owns_layout = existing is None
        self.layout = create_layout(layout, spec, pool.backend, dtype) if existing is None else existing
        self.blocks: dict[int, KVBlock] = {}
        self._mapped: dict[int, set[tuple[int, int]]] = {}  # block id -> (slot, page) where it is mapped
        if existing is None:
            pool.register(KV_CLIENT)

    def layer_caches(self) -> list[tuple]:
        return self.layout.layer_caches()

    def apply(self, log: list[tuple]) -> None:
        for entry in log:
            getattr(self, "_" + entry[0])(*entry[1:])

    def _block(self, block_id: int, group: int, kinds: str | None = None) -> KVBlock:
        block = self.blocks.get(block_id)
        if block is None:
            if kinds is not None and set(kinds) != {"p"}:  # layers on the host: the chunks of rank 0's kinds
                block = KVBlock(block_id, group, self._chunks(kinds), ref_count=1)
            else:  # pool chunks for every held layer (a KunServe follower holds other layers than its leader)
                held = getattr(self.layout, "held_layers", None)
                layers = self.spec.groups[group].layers
                num_chunks = 2 * (len(layers) if held is None else sum(layer in held for layer in layers))
                block = KVBlock(block_id, group, self.pool.inflate(KV_CLIENT, num_chunks), ref_count=1)
            self.blocks[block_id] = block
        return block

    def _chunks(self, kinds: str) -> list:
        pool = iter(self.pool.inflate(KV_CLIENT, kinds.count("p")))
        tier = iter(self.host_tier.allocate(kinds.count("t")) if "t" in kinds else [])
        return [next(pool) if kind == "p" else next(tier) if kind == "t" else None for kind in kinds]

    def _give_back(self, chunks) -> None:
        pool = [chunk for chunk in chunks if chunk is not None and chunk.owner != HOST_TIER]
        if pool:
            self.pool.deflate(KV_CLIENT, pool)
        tier = [chunk for chunk in chunks if chunk is not None and chunk.owner == HOST_TIER]
        if tier:
            self.host_tier.release(tier)

    def _position(self, group: int, layer: int) -> int:
        return 2 * self.spec.groups[group].layers.index(layer)

    def _map(self, block_id: int, group: int, slot: int, page: int, kinds: str | None = None) -> None:
        self.layout.map_block(slot, page, self._block(block_id, group, kinds))
        self._mapped.setdefault(block_id, set()).add((slot, page))

    def _unmap(self, block_id: int, slot: int, page: int) -> None:
        self.layout.unmap_block(slot, page, self.blocks[block_id])
        self._mapped[block_id].discard((slot, page))

    def _move(self, block_id: int, src_slot: int, dst_slot: int, page: int) -> None:
        self.layout.move_block(self.blocks[block_id], src_slot, dst_slot, page)
        self._mapped[block_id].discard((src_slot, page))
        self._mapped[block_id].add((dst_slot, page))

    def _to_host(self, block_id: int, slot: int, page: int, host_slots: tuple[int, ...]) -> None:
        allocated = self.host_buffer.allocate(len(host_slots))
        if tuple(allocated) != tuple(host_slots):
            raise RuntimeError(f"host buffer diverged from rank 0: {allocated} != {host_slots}")
        self.layout.copy_block_to_host(slot, page, self.blocks[block_id], self.host_buffer, list(host_slots))

    def _from_host(self, block_id: int, slot: int, page: int, host_slots: tuple[int, ...]) -> None:
        self.layout.copy_block_from_host(slot, page, self.blocks[block_id], self.host_buffer, list(host_slots))

    def _copy(self, src_slot: int, dst_slot: int, page: int, src_id: int, dst_id: int) -> None:
        self.layout.copy_block(src_slot, dst_slot, page, self.blocks[src_id], self.blocks[dst_id])

    def _release_host(self, host_slots: tuple[int, ...]) -> None:
        self.host_buffer.free(list(host_slots))

    def _free(self, block_id: int) -> None:
        block = self.blocks.pop(block_id)
        self._mapped.pop(block_id, None)
        self._give_back(block.chunks)

    def _host_alloc(self, host_slots: tuple[int, ...]) -> None:
        allocated = self.host_buffer.allocate(len(host_slots))
        if tuple(allocated) != tuple(host_slots):
            raise RuntimeError(f"host buffer diverged from rank 0: {allocated} != {host_slots}")

    def _layer_to_host(self, block_id: int, layer: int, slot: int, page: int, host: tuple[int, int]) -> None:
        block = self.blocks[block_id]
        position = self._position(block.group, layer)
        self.layout.layer_page_to_host(block, layer, slot, page, self.host_buffer, host)
        self.pool.deflate(KV_CLIENT, block.chunks[position : position + 2])
        block.chunks[position] = block.chunks[position + 1] = None

    def _layer_from_host(self, block_id: int, layer: int, slot: int, page: int, host: tuple[int, int]) -> None:
        block = self.blocks[block_id]
        position = self._position(block.group, layer)
        chunks = tuple(self.pool.inflate(KV_CLIENT, 2))
        block.chunks[position], block.chunks[position + 1] = chunks
        self.layout.layer_page_from_host(block, layer, slot, page, chunks, self.host_buffer, host)

    def _swap_layer(self, block_id: int, layer: int, slot: int, page: int, kinds: str) -> None:
        block = self.blocks[block_id]
        position = self._position(block.group, layer)
        chunks = tuple(self._chunks(kinds))
        old = self.layout.swap_layer_page(block, layer, slot, page, chunks)
        block.chunks[position], block.chunks[position + 1] = chunks
        self._give_back(old)

    def _stage(self, plan: list) -> None:
        self.staging_plan = plan

    def take_staging_plan(self) -> list | None:
        plan, self.staging_plan = self.staging_plan, None
        return plan

    def close(self) -> None:
        if self._owns_layout:
            self.layout.close()
        else:  # the layout lives on: no page may stay mapped to a chunk given back
            for block_id, places in self._mapped.items():
                for slot, page in places:
                    self.layout.unmap_block(slot, page, self.blocks[block_id])
        for block in self.blocks.values():
            self._give_back(block.chunks)
        self.blocks.clear()
        self._mapped.clear()
        if self.host_tier is not None:
            self.host_tier.close()

    @property
    def num_chunks(self) -> int:
        """Pool chunks the mirrored blocks hold."""
        return sum(1 for block in self.blocks.values() for chunk in block.chunks
                   if chunk is not None and chunk.owner != HOST_TIER)
