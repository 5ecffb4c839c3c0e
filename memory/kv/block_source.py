"""Where a KVCacheManager's blocks get their physical chunks: the strategy behind `grow`, swap-in,
imports and the admission checks.

- `LooseChunks` (the `contiguous` layout): a block takes `2 x layers` pool chunks of the `kv` balloon
  one by one; cached blocks' chunks are reused directly when evicted. Layer-wise offloading needs it
  (it trades single chunks of a block for host chunks).
- `LcmBlocks` (the `paged` layout): a block is one small page of its layer group's kind in Jenga's
  two-level allocator (memory/lcm_allocator.py), owned by a `KVBalloon` (memory/kv/balloon.py) that
  other KV managers of the same pool may share. Cached blocks are marked evictable in the allocator,
  so a large page holding only cached blocks counts as memory the pool can have back.

Contract: `chunks_for(pages)` (pages: per layer group, how many new blocks) is the number of pool
chunks taking them needs beyond what the source already holds; `take(groups)` returns, per requested
group in order, the block's chunks and the handle `give_back` needs, or None with nothing taken when
`chunks_for(...) > available()`; evicting cached blocks to make room happens inside `take`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

from memory.kv.balloon import KVBalloon
from memory.kv.blocks import KVBlock, PrefixCache
from memory.kv.layout import KVLayout
from memory.lcm_allocator import KindTelemetry, SmallPage
from memory.pool import ElasticPool
from memory.vmm.base import PhysicalChunk

TakenBlock = tuple[list[PhysicalChunk], SmallPage | None]


class BlockOwner(Protocol):
    """What a source needs of the KVCacheManager that owns it (the manager imports this module, not the
    other way round)."""

    pool: ElasticPool
    prefix: PrefixCache
    layout: KVLayout
    _kv_client: str
    _chunks_per_block: list[int]

    def _reclaim(self, chunks: int) -> int: ...

    def _take_chunks(self, count: int) -> list[PhysicalChunk] | None: ...

    def _release_chunks(self, chunks: Sequence[PhysicalChunk]) -> None: ...


class BlockSource(ABC):
    @abstractmethod
    def chunks_for(self, pages: Sequence[int]) -> int:
        """Pool chunks that `pages[g]` new blocks of each group g need."""

    @abstractmethod
    def available(self, holding: Sequence[KVBlock] = ()) -> int:
        """Pool chunks a new allocation could get: free, evictable, and what other balloons give back,
        once the cached blocks in `holding` are held (no longer evictable)."""

    @abstractmethod
    def used(self) -> int:
        """Pool chunks held for live requests (not counting evictable cached blocks)."""

    @abstractmethod
    def cached(self) -> int:
        """Pool chunks held only for evictable cached blocks (what evicting them all gives back)."""

    @abstractmethod
    def take(self, groups: Sequence[int]) -> list[TakenBlock] | None: ...

    @abstractmethod
    def give_back(self, block: KVBlock) -> None:
        """The block's chunks are no longer needed (unmapped everywhere)."""

    def parked(self, block: KVBlock, evictable: bool) -> None:  # noqa: B027 - loose chunks track nothing
        """A cached block became evictable (parked) or held again."""

    def resize(self, chunks_per_block: Sequence[int]) -> None:  # noqa: B027
        """Blocks now take these many chunks per group (only while the manager holds nothing)."""

    def telemetry(self) -> dict[str, KindTelemetry]:
        return {}

    def close(self) -> None:  # noqa: B027
        """The manager closed (it gave every block back first)."""


class LooseChunks(BlockSource):
    def __init__(self, kv: BlockOwner):
        self.kv = kv
        kv.pool.register(kv._kv_client, reclaim=kv._reclaim, reclaimable=lambda: kv.prefix.num_evictable_chunks)

    def chunks_for(self, pages: Sequence[int]) -> int:
        return sum(count * per_block for count, per_block in zip(pages, self.kv._chunks_per_block, strict=True))

    def available(self, holding: Sequence[KVBlock] = ()) -> int:
        pinned = sum(len(block.chunks) for block in {id(b): b for b in holding if b.ref_count == 0}.values())
        return self.kv.prefix.num_evictable_chunks - pinned + self.kv.pool.num_obtainable(self.kv._kv_client)

    def used(self) -> int:
        return self.kv.pool.num_held(self.kv._kv_client) - self.kv.prefix.num_evictable_chunks

    def cached(self) -> int:
        return self.kv.prefix.num_evictable_chunks

    def take(self, groups: Sequence[int]) -> list[TakenBlock] | None:
        chunks = self.kv._take_chunks(sum(self.kv._chunks_per_block[g] for g in groups))
        if chunks is None:
            return None
        return [([chunks.pop() for _ in range(self.kv._chunks_per_block[g])], None) for g in groups]

    def give_back(self, block: KVBlock) -> None:
        self.kv._release_chunks(block.chunks)


class LcmBlocks(BlockSource):
    def __init__(self, kv: BlockOwner, balloon: KVBalloon, owner: str):
        self.kv = kv
        self.balloon = balloon
        self.allocator = balloon.allocator
        self.owner = owner
        self.kinds = list(balloon.attach(owner, self._sizes(kv._chunks_per_block), self._evict_one).values())

    def _sizes(self, chunks_per_block: Sequence[int]) -> dict[str, int]:
        # a group none of whose layers this rank holds (KunServe) has empty blocks: they take no page,
        # but the kind stays registered (at one chunk, never allocated) so group indices keep their kinds
        return {f"g{group}": max(count, 1) * self.kv.pool.chunk_bytes for group, count in enumerate(chunks_per_block)}

    def _paged(self, pages: Sequence[int]) -> dict[str, int]:
        return {kind: count for kind, count, per_block in zip(self.kinds, pages, self.kv._chunks_per_block, strict=True)
                if per_block}

    def chunks_for(self, pages: Sequence[int]) -> int:
        return self.allocator.pool_chunks_for(self._paged(pages))

    def available(self, holding: Sequence[KVBlock] = ()) -> int:
        # every member's cached blocks can be evicted for this one (take() evicts across the balloon), but
        # a large page only gives back whole: one held small page keeps all of it
        pinned = [block.small_page for block in holding if block.ref_count == 0 and block.small_page is not None]
        return self.kv.pool.num_obtainable(self.balloon.client) + self.allocator.num_reclaimable_chunks(
            holding=pinned)

    def used(self) -> int:
        held = sum(self.allocator.telemetry(kind).num_large_pages for kind in self.kinds)
        return held * self.allocator.chunks_per_large_page - self.cached()

    def cached(self) -> int:
        return self.allocator.num_reclaimable_chunks(self.kinds)

    def take(self, groups: Sequence[int]) -> list[TakenBlock] | None:
        counts = Counter(groups)
        wanted = self._paged([counts[g] for g in range(len(self.kinds))])
        if self.allocator.pool_chunks_for(wanted) > self.available():
            return None
        while True:
            pages = self.allocator.allocate_many({kind: wanted[kind] for kind in sorted(wanted)})
            if pages is not None:
                break
            if self.balloon.evict_one() is None:
                return None
        order = {kind: iter(got) for kind, got in pages.items()}
        taken: list[TakenBlock] = []
        for g in groups:
            if not self.kv._chunks_per_block[g]:
                taken.append(([], None))
                continue
            page = next(order[self.kinds[g]])
            taken.append((self.allocator.small_page_chunks(page), page))
        return taken

    def give_back(self, block: KVBlock) -> None:
        if block.small_page is not None:
            self.allocator.free([block.small_page])

    def parked(self, block: KVBlock, evictable: bool) -> None:
        if block.small_page is not None:
            self.allocator.set_evictable(block.small_page, evictable)

    def resize(self, chunks_per_block: Sequence[int]) -> None:
        sizes = self._sizes(chunks_per_block)
        self.balloon.resize({f"{self.owner}/{name}": size for name, size in sizes.items()})

    def telemetry(self) -> dict[str, KindTelemetry]:
        return {kind: self.allocator.telemetry(kind) for kind in self.kinds}

    def close(self) -> None:
        self.balloon.detach(self.owner)

    def _evict_one(self) -> int | None:
        block = self.kv.prefix.evict_oldest()
        if block is None:
            return None
        self.kv.layout.block_freed(block)
        return self.allocator.free([block.small_page]) if block.small_page is not None else 0
