"""Jenga's two-level allocator: large pages from the ElasticPool, each cut into one kind's small pages.

Kinds (a layer group of one model, another model's KV, a constant-size state) each have their own
small-page size. A *large page* is `chunks_per_large_page` pool chunks, sized as the least common
multiple of every kind's small-page size rounded up to whole chunks, so every kind cuts it into a
whole number of small pages (with no waste when the LCM is itself a whole number of chunks; else
the remainder is counted as fragmentation). A large page belongs to one kind at a time; once all
its small pages are free it goes straight back to the pool, where the activations and the other
kinds can take it, so every kind still balloons against everything else.

Variants (the benchmarks' baselines) are the same class with another page policy
(memory/page_policies.py, by name):
- `pad_to_largest`: every kind's small page is the largest one (vLLM's hybrid KV cache manager);
- `static_partition`: each kind may hold at most a fixed number of large pages.
A padded page holds the kind's data in its first bytes (`small_page_chunks` returns those chunks); the
rest is held and never used. Beyond a static partition's limit `pool_chunks_for` says "more than the pool
has", so the KV manager's admission checks see the kind as full.

Kinds can be added later with `register` (a second model's KV manager drawing from the same pool:
memory/kv/balloon.py); the policy re-sizes every kind, the large-page size is recomputed while no large
page is held, and after that a new kind must fit in the current large page (its remainder counts as
fragmentation) and a kind holding pages keeps its size.

Evictable pages: a small page in use may be marked evictable (a cached prefix block nobody holds). A
large page whose pages in use are all evictable is *reclaimable*: evicting them returns it to the pool.
`pool_chunks_for` says how many pool chunks an allocation would need once everything evictable were
evicted, which is what the KV manager's admission checks compare against.

Contract (checked by tests/memory/test_lcm_allocator.py's state machine): the pool's budget is
never exceeded (chunks come only from `pool.inflate`); a small page is free in exactly one large
page or held by exactly one owner; a large page with no small page in use is never kept; a kind's
held bytes = its large pages x large-page bytes; the evictable counts equal the marked pages.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from memory.page_policies import PadToLargest, PagePolicy, StaticPartition, create_page_policy
from memory.pool import ElasticPool, PoolExhausted
from memory.vmm.base import PhysicalChunk


@dataclass(frozen=True)
class SmallPage:
    kind: str
    large_page: int  # id of the large page it is cut from
    index: int  # position inside that large page (byte offset = index * the kind's small-page bytes)


@dataclass(frozen=True)
class KindTelemetry:
    kind: str
    small_page_bytes: int  # what the kind asked for
    allocated_page_bytes: int  # what one of its pages takes (padding variants: more than asked)
    num_large_pages: int
    num_pages_used: int
    bytes_held: int  # large pages owned by the kind
    bytes_used: int  # the requested bytes of the small pages in use

    @property
    def internal_fragmentation_bytes(self) -> int:
        return self.bytes_held - self.bytes_used

    @property
    def utilisation(self) -> float:
        return self.bytes_used / self.bytes_held if self.bytes_held else 1.0


@dataclass
class _LargePage:
    page_id: int
    kind: str
    chunks: list[PhysicalChunk]
    free: list[int]  # free small-page indices, ascending (lowest given first)
    used: int = 0
    evictable: int = 0  # pages in use marked evictable

    @property
    def reclaimable(self) -> bool:
        return self.used == self.evictable

@dataclass
class LcmAllocator:
    pool: ElasticPool
    client: str
    small_page_bytes: Mapping[str, int]  # kind -> bytes one small page of it holds
    policy: PagePolicy | str = "lcm"  # memory/page_policies.py: how pages are sized and shares capped
    allocated_page_bytes: dict[str, int] = field(init=False)  # what one page of each kind takes
    max_large_pages: dict[str, int] | None = field(init=False)  # per kind (static partition); None: no cap
    large_page_bytes: int = field(init=False)
    chunks_per_large_page: int = field(init=False)

    def __post_init__(self) -> None:
        if any(size < 1 for size in self.small_page_bytes.values()):
            raise ValueError("every kind needs a positive small-page size")
        if isinstance(self.policy, str):
            self.policy = create_page_policy(self.policy)
        self.small_page_bytes = dict(self.small_page_bytes)
        self._large: dict[int, _LargePage] = {}
        self._by_kind: dict[str, list[int]] = {kind: [] for kind in self.small_page_bytes}
        self._used: set[SmallPage] = set()
        self._evictable: set[SmallPage] = set()
        self._num_reclaimable = dict.fromkeys(self.small_page_bytes, 0)  # per kind: reclaimable large pages
        self._next_id = 0
        self.allocated_page_bytes = self._allocated()
        self._size_large_pages()
        if self.client not in self.pool.clients:
            self.pool.register(self.client)

    def _allocated(self) -> dict[str, int]:
        allocated = self.policy.allocated_bytes(self.small_page_bytes)
        for kind, size in self.small_page_bytes.items():
            if allocated[kind] < size:
                raise ValueError(f"kind {kind!r}: allocated pages smaller than requested")
        return allocated

    def _size_large_pages(self) -> None:
        if not self._large:
            common = math.lcm(*self.allocated_page_bytes.values()) if self.allocated_page_bytes else 1
            self.chunks_per_large_page = -(-common // self.pool.chunk_bytes)
            self.large_page_bytes = self.chunks_per_large_page * self.pool.chunk_bytes
        self._pages_per_large = {kind: self.large_page_bytes // size
                                 for kind, size in self.allocated_page_bytes.items()}
        self.max_large_pages = self.policy.large_page_limits(self.allocated_page_bytes, self.chunks_per_large_page,
                                                             self.pool)

    def register(self, small_page_bytes: Mapping[str, int]) -> None:
        """Adds kinds (or resizes kinds that hold nothing). While no large page is held the large-page
        size becomes the LCM of every kind; after that a kind must fit in one large page."""
        for kind, size in small_page_bytes.items():
            if size < 1:
                raise ValueError(f"kind {kind!r} needs a positive small-page size")
            if self._by_kind.get(kind):
                raise ValueError(f"kind {kind!r} holds large pages: it cannot be resized now")
        sizes = {**self.small_page_bytes, **small_page_bytes}
        allocated = self.policy.allocated_bytes(sizes)
        for kind, pages in self._by_kind.items():
            if pages and allocated[kind] != self.allocated_page_bytes[kind]:
                raise ValueError(f"kind {kind!r} holds large pages: the policy cannot resize its pages now")
        if self._large and max(allocated.values(), default=0) > self.large_page_bytes:
            raise ValueError(f"a new kind's page exceeds the {self.large_page_bytes} B large pages already in use")
        for kind in small_page_bytes:
            self._by_kind.setdefault(kind, [])
            self._num_reclaimable.setdefault(kind, 0)
        self.small_page_bytes = sizes
        self.allocated_page_bytes = self._allocated()
        self._size_large_pages()

    @classmethod
    def pad_to_largest(cls, pool: ElasticPool, client: str, small_page_bytes: Mapping[str, int]) -> LcmAllocator:
        return cls(pool, client, small_page_bytes, PadToLargest())

    @classmethod
    def static_partition(cls, pool: ElasticPool, client: str, small_page_bytes: Mapping[str, int],
                         shares: Mapping[str, float]) -> LcmAllocator:
        """Each kind gets `share` of the large pages the pool's free chunks make, fixed up front."""
        return cls(pool, client, small_page_bytes, StaticPartition(shares))

    @property
    def policy_name(self) -> str:
        return self.policy.name

    # ---- queries -------------------------------------------------------------------------------
    def pages_per_large_page(self, kind: str) -> int:
        return self._pages_per_large[kind]

    def num_free_pages(self, kind: str) -> int:
        """Small pages of `kind` obtainable now without evicting anything: free ones in the kind's large
        pages plus whole new large pages the pool could lend."""
        in_kind = sum(len(self._large[i].free) for i in self._by_kind[kind])
        new_large = self.pool.num_obtainable(self.client) // self.chunks_per_large_page
        if self.max_large_pages is not None:
            new_large = min(new_large, self.max_large_pages[kind] - len(self._by_kind[kind]))
        return in_kind + max(new_large, 0) * self._pages_per_large[kind]

    def num_local_pages(self, kind: str) -> int:
        """Small pages of `kind` its large pages would have free once every evictable page were evicted
        (large pages that would empty entirely are not counted: they go back to the pool)."""
        in_kind = sum(len(self._large[i].free) + self._large[i].evictable for i in self._by_kind[kind])
        return in_kind - self._num_reclaimable[kind] * self._pages_per_large[kind]

    def num_reclaimable_chunks(self, kinds: Iterable[str] | None = None, holding: Iterable[SmallPage] = ()) -> int:
        """Pool chunks that evicting every evictable page (of `kinds`; None: all) would give back, with the
        evictable pages in `holding` kept (their large pages then stay)."""
        kept = {page.large_page for page in holding if self._large[page.large_page].reclaimable}
        kinds = set(kinds or self._num_reclaimable)
        kept_pages = sum(1 for large in kept if self._large[large].kind in kinds)
        return self.chunks_per_large_page * (sum(self._num_reclaimable[kind] for kind in kinds) - kept_pages)

    def pool_chunks_for(self, pages: Mapping[str, int]) -> int:
        """Pool chunks that allocating `pages` (kind -> count) needs beyond the kinds' local pages."""
        large = 0
        for kind, count in pages.items():
            if not count:
                continue
            new = -(-max(0, count - self.num_local_pages(kind)) // self._pages_per_large[kind])
            if self.max_large_pages is not None and new > self.max_large_pages[kind] - len(self._by_kind[kind]):
                return self.pool.num_chunks + 1  # beyond the kind's share: more than the pool could ever give
            large += new
        return large * self.chunks_per_large_page

    def set_evictable(self, page: SmallPage, evictable: bool) -> None:
        """Marks a page in use as evictable (a cached block nobody holds) or held again."""
        if page not in self._used:
            raise ValueError(f"{page} is not allocated")
        if (page in self._evictable) == evictable:
            return
        large = self._large[page.large_page]
        before = large.reclaimable
        if evictable:
            self._evictable.add(page)
            large.evictable += 1
        else:
            self._evictable.discard(page)
            large.evictable -= 1
        self._num_reclaimable[large.kind] += large.reclaimable - before

    def small_page_chunks(self, page: SmallPage) -> list[PhysicalChunk]:
        """The pool chunks a small page's data occupies (a padded page: its first ones), when its kind's
        pages are whole chunks."""
        size, wanted = self.allocated_page_bytes[page.kind], self.small_page_bytes[page.kind]
        if size % self.pool.chunk_bytes or wanted % self.pool.chunk_bytes:
            raise ValueError(f"kind {page.kind!r}: {size} B pages are not whole {self.pool.chunk_bytes} B chunks")
        start = page.index * (size // self.pool.chunk_bytes)
        return self._large[page.large_page].chunks[start:start + wanted // self.pool.chunk_bytes]

    def telemetry(self, kind: str) -> KindTelemetry:
        large = self._by_kind[kind]
        used = sum(self._large[i].used for i in large)
        return KindTelemetry(kind, self.small_page_bytes[kind], self.allocated_page_bytes[kind], len(large), used,
                             len(large) * self.large_page_bytes, used * self.small_page_bytes[kind])

    def all_telemetry(self) -> dict[str, KindTelemetry]:
        return {kind: self.telemetry(kind) for kind in self.small_page_bytes}

    def large_page_chunks(self, large_page: int) -> list[PhysicalChunk]:
        return list(self._large[large_page].chunks)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, kind: str, count: int = 1) -> list[SmallPage] | None:
        """`count` small pages of `kind` (lowest large page first, to keep large pages full so empty
        ones can go back); None, with nothing taken, if they cannot all be had."""
        if count > self.num_free_pages(kind):
            return None
        pages: list[SmallPage] = []
        for large_id in sorted(self._by_kind[kind]):
            large = self._large[large_id]
            while large.free and len(pages) < count:
                pages.append(self._take(large))
        while len(pages) < count:
            large = self._new_large_page(kind)
            if large is None:  # the pool changed under us: undo, all or nothing
                self.free(pages)
                return None
            while large.free and len(pages) < count:
                pages.append(self._take(large))
        return pages

    def allocate_many(self, counts: Mapping[str, int]) -> dict[str, list[SmallPage]] | None:
        """`allocate` for several kinds at once: all of them, or None with nothing taken."""
        taken: dict[str, list[SmallPage]] = {}
        for kind, count in counts.items():
            pages = self.allocate(kind, count)
            if pages is None:
                for got in taken.values():
                    self.free(got)
                return None
            taken[kind] = pages
        return taken

    def free(self, pages: list[SmallPage]) -> int:
        """Frees pages (evictable or not); returns the pool chunks given back (emptied large pages)."""
        returned = 0
        for page in pages:
            if page not in self._used:
                raise ValueError(f"{page} is not allocated")
            large = self._large[page.large_page]
            before = large.reclaimable
            if page in self._evictable:
                self._evictable.discard(page)
                large.evictable -= 1
            self._used.discard(page)
            large.used -= 1
            large.free.append(page.index)
            large.free.sort()
            if large.used == 0:  # whole large page free: back to the pool for any kind or balloon
                self._num_reclaimable[large.kind] -= before
                del self._large[large.page_id]
                self._by_kind[large.kind].remove(large.page_id)
                self.pool.deflate(self.client, large.chunks)
                returned += len(large.chunks)
            else:
                self._num_reclaimable[large.kind] += large.reclaimable - before
        return returned

    def close(self) -> None:
        for large in self._large.values():
            self.pool.deflate(self.client, large.chunks)
        self._large.clear()
        self._used.clear()
        self._evictable.clear()
        self._num_reclaimable = dict.fromkeys(self._num_reclaimable, 0)
        for pages in self._by_kind.values():
            pages.clear()

    def _take(self, large: _LargePage) -> SmallPage:
        page = SmallPage(large.kind, large.page_id, large.free.pop(0))
        if large.reclaimable and large.used:  # a live page joins: no longer reclaimable
            self._num_reclaimable[large.kind] -= 1
        large.used += 1
        self._used.add(page)
        return page

    def _new_large_page(self, kind: str) -> _LargePage | None:
        if self.max_large_pages is not None and len(self._by_kind[kind]) >= self.max_large_pages[kind]:
            return None
        try:
            chunks = self.pool.inflate(self.client, self.chunks_per_large_page)
        except PoolExhausted:
            return None
        large = _LargePage(self._next_id, kind, chunks, list(range(self._pages_per_large[kind])))
        self._next_id += 1
        self._large[large.page_id] = large
        self._by_kind[kind].append(large.page_id)
        return large
