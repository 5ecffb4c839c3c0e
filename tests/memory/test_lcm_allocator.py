"""The LCM two-level allocator: exact large-page sizes and ids, per-kind telemetry, the padding and
static-partition variants, and a state machine over random allocate/free/activation traffic."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from memory import ElasticPool, create_backend
from memory.lcm_allocator import LcmAllocator, SmallPage

CHUNK = 2 << 20  # the sim backend models CUDA granules


def _pool(num_chunks: int) -> ElasticPool:
    pool = ElasticPool(create_backend("sim"), num_chunks * CHUNK, CHUNK)
    pool.register("activations")
    return pool


def test_large_pages_are_the_lcm_in_whole_chunks_and_go_back_when_empty():
    # Gemma-3-like kinds: 3 full layers vs 15 sliding layers per page (1:5), and a third kind of 3 units
    pool = _pool(64)
    alloc = LcmAllocator(pool, "kv", {"full": 3 * CHUNK, "sliding": 15 * CHUNK, "state": 2 * CHUNK})
    assert (alloc.chunks_per_large_page, alloc.large_page_bytes) == (30, 30 * CHUNK)
    assert [alloc.pages_per_large_page(k) for k in ("full", "sliding", "state")] == [10, 2, 15]
    full = alloc.allocate("full", 11)
    assert [(p.large_page, p.index) for p in full] == [(0, i) for i in range(10)] + [(1, 0)]
    assert alloc.allocate("sliding", 1) is None  # 60 of 64 chunks held: no third large page
    assert pool.num_held("kv") == 60
    alloc.free(full[10:])  # large page 1 is empty: it goes back to the pool at once
    assert pool.num_held("kv") == 30
    sliding = alloc.allocate("sliding", 2)
    assert [(p.kind, p.large_page, p.index) for p in sliding] == [("sliding", 2, 0), ("sliding", 2, 1)]
    t = alloc.telemetry("full")
    assert (t.num_large_pages, t.num_pages_used, t.bytes_held, t.bytes_used, t.internal_fragmentation_bytes) == (
        1, 10, 30 * CHUNK, 30 * CHUNK, 0)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(full[10:])
    alloc.close()
    assert pool.num_held("kv") == 0


def test_coprime_sizes_round_the_lcm_up_to_chunks_and_count_the_rest_as_fragmentation():
    pool = _pool(64)
    alloc = LcmAllocator(pool, "kv", {"a": 3 * 1000 * 512, "b": 7 * 1000 * 512})  # lcm 21,000 x 512 B = 5.1 chunks
    assert (alloc.chunks_per_large_page, alloc.pages_per_large_page("a"), alloc.pages_per_large_page("b")) == (6, 8, 3)
    alloc.allocate("a", 8), alloc.allocate("b", 3)
    assert alloc.telemetry("a").internal_fragmentation_bytes == 6 * CHUNK - 8 * 3000 * 512
    assert alloc.telemetry("b").internal_fragmentation_bytes == 6 * CHUNK - 3 * 7000 * 512


def test_padding_and_static_partition_variants():
    pool = _pool(60)
    padded = LcmAllocator.pad_to_largest(pool, "kv", {"full": 3 * CHUNK, "sliding": 15 * CHUNK})
    assert padded.pages_per_large_page("full") == padded.pages_per_large_page("sliding") == 1
    padded.allocate("full", 4)  # four 15-chunk pages for 3 chunks of data each
    t = padded.telemetry("full")
    assert (t.bytes_held, t.bytes_used, round(t.utilisation, 2)) == (60 * CHUNK, 12 * CHUNK, 0.2)
    assert padded.allocate("sliding", 1) is None
    padded.close()
    static = LcmAllocator.static_partition(pool, "kv2", {"full": 3 * CHUNK, "sliding": 15 * CHUNK},
                                           {"full": 0.5, "sliding": 0.5})
    assert static.max_large_pages == {"full": 2, "sliding": 2}  # 60 chunks = four 15-chunk large pages
    assert static.allocate("full", 11) is None and static.allocate("full", 10) is not None
    assert static.num_free_pages("full") == 0 and static.num_free_pages("sliding") == 2  # half the pool idles


kinds = st.sampled_from(("a", "b", "c"))


class LcmMachine(RuleBasedStateMachine):
    """Random allocate/free of three kinds with coprime sizes, while activations balloon."""

    num_chunks = 40
    sizes = {"a": 2 * CHUNK, "b": 3 * CHUNK, "c": 5 * CHUNK}  # one 30-chunk large page at a time

    def __init__(self) -> None:
        super().__init__()
        self.pool = _pool(self.num_chunks)
        self.alloc = LcmAllocator(self.pool, "kv", self.sizes)
        self.held: list[SmallPage] = []
        self.activations: list = []

    @rule(kind=kinds, count=st.integers(1, 20))
    def allocate(self, kind, count):
        free_before = self.alloc.num_free_pages(kind)
        pages = self.alloc.allocate(kind, count)
        assert (pages is None) == (count > free_before)
        if pages is not None:
            assert len(pages) == count and all(p.kind == kind for p in pages)
            self.held.extend(pages)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def free(self, data):
        picked = data.draw(st.lists(st.sampled_from(self.held), min_size=1, unique=True))
        self.alloc.free(picked)
        self.held = [page for page in self.held if page not in picked]

    @rule(count=st.integers(1, 10))
    def activations_take(self, count):
        if self.pool.num_free() >= count:
            self.activations.extend(self.pool.inflate("activations", count))

    @precondition(lambda self: self.activations)
    @rule()
    def activations_give_back(self):
        self.pool.deflate("activations", self.activations)
        self.activations = []

    @invariant()
    def within_budget_and_every_page_in_one_place(self):
        held_chunks = self.pool.num_held("kv")
        assert held_chunks <= self.pool.num_chunks
        assert held_chunks + self.pool.num_held("activations") + self.pool.num_free() == self.pool.num_chunks
        assert len(set(self.held)) == len(self.held)
        places = set()
        for kind in ("a", "b", "c"):
            t = self.alloc.telemetry(kind)
            assert t.bytes_held == t.num_large_pages * self.alloc.large_page_bytes
            assert t.num_pages_used == sum(1 for page in self.held if page.kind == kind)
        for large_id, large in self.alloc._large.items():
            assert large.used > 0  # empty large pages went back to the pool
            assert large.used + len(large.free) == self.alloc.pages_per_large_page(large.kind)
            assert len(set(large.free)) == len(large.free)
            for index in large.free:
                places.add((large_id, index))
        for page in self.held:
            assert (page.large_page, page.index) not in places  # not both free and held
            assert self.alloc._large[page.large_page].kind == page.kind
        assert held_chunks == len(self.alloc._large) * self.alloc.chunks_per_large_page

    def teardown(self) -> None:
        self.alloc.close()
        assert self.pool.num_held("kv") == 0


TestLcmMachine = LcmMachine.TestCase
TestLcmMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


class SubChunkCoprimeMachine(LcmMachine):
    """Coprime small pages smaller than a chunk (3, 5 and 7 eighths): the LCM (105 eighths = 13.1 chunks)
    is rounded up to 14 chunks, so each large page has slack, and 60 chunks hold four large pages at once
    (kinds take turns holding them)."""

    num_chunks = 60
    sizes = {"a": 3 * CHUNK // 8, "b": 5 * CHUNK // 8, "c": 7 * CHUNK // 8}

    @invariant()
    def large_pages_are_whole_chunks_with_slack(self):
        assert self.alloc.chunks_per_large_page == 14
        assert [self.alloc.pages_per_large_page(k) for k in "abc"] == [37, 22, 16]  # floor(14 x 8 / size)


TestSubChunkCoprimeMachine = SubChunkCoprimeMachine.TestCase
TestSubChunkCoprimeMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
