"""Torch-free bookkeeping of KV blocks: reference counts, prefix hashes and the LRU of cached blocks.

A block is one page-sized run of tokens (`tokens_per_page`) for every layer of one layer group, K and
V: `2 * len(group.layers)` physical chunks. Blocks are shared between requests by mapping the same
chunks at several virtual places; the reference count says how many requests hold it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from memory.vmm.base import PhysicalChunk


@dataclass(eq=False)
class KVBlock:
    block_id: int
    group: int  # index into KVCacheSpec.groups
    chunks: list[PhysicalChunk]  # [K of layer 0, V of layer 0, K of layer 1, ...] of the group
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and its tokens are known
    page: int = -1  # its page index in the request's token order, once hashed (for the evictor)
    # a prefix hit has used it, or another request computed the same tokens again (a shared prefix that
    # missed): the evictor keeps such prefixes longest
    reused: bool = False
    release: int = 0  # the request that parked it (one request's blocks are evicted as a group)
    small_page: Any = None  # its page in the LCM allocator (memory/kv/block_source.py LcmBlocks); None: loose chunks


def chain_hash(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """A full block's hash: its tokens and everything before them (through the parent's hash)."""
    return hash((parent_hash, tuple(token_ids)))


def prefix_hashes(token_ids: Sequence[int], tokens_per_page: int) -> list[int]:
    """Hashes of every full block of `token_ids`, chained from the first."""
    hashes: list[int] = []
    parent = None
    for start in range(0, len(token_ids) - tokens_per_page + 1, tokens_per_page):
        parent = chain_hash(parent, token_ids[start : start + tokens_per_page])
        hashes.append(parent)
    return hashes


@dataclass
class PrefixCache:
    """Full blocks by (group, hash). Blocks nobody holds stay here, evictable in LRU order."""

    by_hash: dict[tuple[int, int], KVBlock] = field(default_factory=dict)
    evictable: OrderedDict[int, KVBlock] = field(default_factory=OrderedDict)  # block_id -> block, LRU first
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0
    num_evictable_chunks: int = 0  # kept as a count: the scheduler asks for it many times per step
    # None: plain LRU; else an Evictor (memory/kv/evictor.py) picks among the evictable blocks
    evictor: Any = None
    current_release: int = 0  # the release blocks parked now join (the manager sets it per request)

    def lookup(self, group: int, block_hash: int) -> KVBlock | None:
        return self.by_hash.get((group, block_hash))

    def insert(self, block: KVBlock, block_hash: int) -> KVBlock:
        """Registers a freshly filled block; returns the block already cached under that hash, if any."""
        existing = self.by_hash.get((block.group, block_hash))
        if existing is not None and existing is not block:
            return existing
        block.block_hash = block_hash
        self.by_hash[(block.group, block_hash)] = block
        return block

    def hold(self, block: KVBlock) -> None:
        """A request starts using a cached block: it is no longer evictable."""
        if self.evictable.pop(block.block_id, None) is not None:
            self.num_evictable_chunks -= len(block.chunks)
        block.ref_count += 1
        block.reused = True

    def park(self, block: KVBlock) -> None:
        """The last holder let go of a hashed block: keep it, evictable, most recent last."""
        if block.block_id not in self.evictable:
            self.num_evictable_chunks += len(block.chunks)
        block.release = self.current_release
        self.evictable[block.block_id] = block
        self.evictable.move_to_end(block.block_id)

    def forget(self, block: KVBlock) -> None:
        """A held block stops being a cache entry (its pages are about to diverge from its hash)."""
        del self.by_hash[(block.group, block.block_hash)]
        block.block_hash = None

    def evict_oldest(self) -> KVBlock | None:
        if not self.evictable:
            return None
        if self.evictor is None:
            _, block = self.evictable.popitem(last=False)
        else:
            block = self.evictor.choose_among(list(self.evictable.values()))
            del self.evictable[block.block_id]
        self.num_evictable_chunks -= len(block.chunks)
        del self.by_hash[(block.group, block.block_hash)]
        block.block_hash = None
        return block


@dataclass
class SlotTable:
    """Running requests packed into slots 0..B-1 so the batch's cache view is one slice."""

    max_slots: int
    requests: list[str] = field(default_factory=list)  # slot -> request id
    slot_of: dict[str, int] = field(default_factory=dict)

    def assign(self, request_id: str) -> int:
        if request_id in self.slot_of:
            raise ValueError(f"request {request_id} already has slot {self.slot_of[request_id]}")
        if len(self.requests) >= self.max_slots:
            raise RuntimeError(f"all {self.max_slots} slots are taken")
        self.slot_of[request_id] = len(self.requests)
        self.requests.append(request_id)
        return self.slot_of[request_id]

    def release(self, request_id: str) -> tuple[int, str | None]:
        """Frees the request's slot; the last slot's request moves into the hole.

        Returns (hole, moved request id or None). The caller moves the pages of slot B-1 to `hole`.
        """
        hole = self.slot_of.pop(request_id)
        last_request = self.requests.pop()
        if last_request == request_id:
            return hole, None
        self.requests[hole] = last_request
        self.slot_of[last_request] = hole
        return hole, last_request

    @property
    def num_used(self) -> int:
        return len(self.requests)
