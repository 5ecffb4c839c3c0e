"""The paged KV manager on Jenga's LCM allocator: blocks are small pages of their layer group's kind
inside large pages, cached blocks make large pages reclaimable, empty large pages go back to the pool,
and two KV managers (two models, different page sizes) draw kinds from one balloon. Exact sizes and ids,
and a state machine over random traffic of both managers and the activations."""

from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup
from memory.kv.balloon import KVBalloon

PAGE = 4  # tokens per page
CHUNK = PAGE * 1 * 256 * 4  # one layer's K (or V) page: 4 tokens x 1 head x 256 x fp32 = 4 KiB


def _spec(groups: tuple[LayerGroup, ...], num_layers: int) -> KVCacheSpec:
    return KVCacheSpec(num_layers=num_layers, num_kv_heads=1, head_dim=256, dtype_bytes=4, groups=groups,
                       max_slots=4, max_len=PAGE * 8, tokens_per_page=PAGE)


# Gemma-like: 2 full layers (4 chunks a block) and 3 sliding layers (6 chunks): large pages of 12 chunks
GEMMA = _spec((LayerGroup((0, 1), None), LayerGroup((2, 3, 4), 2 * PAGE)), 5)
SMOL = _spec((LayerGroup((0, 1, 2, 3), None),), 4)  # 8 chunks a block


def _pool(num_chunks: int) -> ElasticPool:
    pool = ElasticPool(create_backend("host"), num_chunks * CHUNK, CHUNK)
    pool.register("activations")
    return pool


def test_blocks_are_small_pages_of_their_kind_and_empty_large_pages_go_back():
    pool = _pool(48)
    kv = KVCacheManager(GEMMA, pool, torch.float32, layout="paged")
    alloc = kv.blocks.allocator
    try:
        assert (alloc.chunks_per_large_page, alloc.pages_per_large_page("kv/g0"),
                alloc.pages_per_large_page("kv/g1")) == (12, 3, 2)
        prompt = list(range(10))
        assert kv.chunks_to_grow(None, 10) == 3 * 12  # 3 full pages: one large page; 3 sliding pages: two
        kv.admit("a", prompt)
        assert kv.grow("a", 10)
        full, sliding = kv.requests["a"].blocks
        assert [(b.small_page.large_page, b.small_page.index) for b in full] == [(0, 0), (0, 1), (0, 2)]
        assert [(b.small_page.large_page, b.small_page.index) for b in sliding] == [(1, 0), (1, 1), (2, 0)]
        assert full[1].chunks == alloc.large_page_chunks(0)[4:8]  # a block's chunks are its slice
        assert pool.num_held("kv") == 36
        assert kv.chunks_to_grow("a", 12) == 0  # page 2 of each kind is already there
        kv.commit("a", prompt, 10)  # window 8: sliding page 0 slides out; pages 0, 1 are cached
        t = kv.kind_telemetry()
        assert (t["kv/g0"].bytes_held, t["kv/g0"].bytes_used) == (12 * CHUNK, 12 * CHUNK)
        assert (t["kv/g1"].bytes_held, t["kv/g1"].internal_fragmentation_bytes) == (24 * CHUNK, 6 * CHUNK)
        assert kv.num_used_chunks() == 36 and kv.num_available_chunks() == 12
        kv.free("a")  # everything cached: every large page is reclaimable, none goes back yet
        assert pool.num_held("kv") == 36 - 12  # sliding page 2 was private (not full): its large page left
        assert kv.num_used_chunks() == 0 and kv.num_available_chunks() == 48
        taken = pool.inflate("activations", 40)  # the pool reclaims through the balloon's evictions
        assert pool.num_held("kv") == 0 and len(taken) == 40
        pool.deflate("activations", taken)
    finally:
        kv.close()
    assert pool.num_held("kv") == 0


def test_two_managers_share_one_balloon_and_never_share_a_large_page():
    pool = _pool(72)
    balloon = KVBalloon(pool)
    gemma = KVCacheManager(GEMMA, pool, torch.float32, layout="paged", balloon=balloon, owner="gemma")
    smol = KVCacheManager(SMOL, pool, torch.float32, layout="paged", balloon=balloon, owner="smol")
    alloc = balloon.allocator
    try:
        assert alloc.chunks_per_large_page == 24  # lcm(4, 6, 8) chunks
        assert [alloc.pages_per_large_page(k) for k in ("gemma/g0", "gemma/g1", "smol/g0")] == [6, 4, 3]
        gemma.admit("g", [1] * 9)
        smol.admit("s", [2] * 9)
        assert gemma.grow("g", 9) and smol.grow("s", 9)
        pages = [b.small_page for kv, r in ((gemma, "g"), (smol, "s")) for group in kv.requests[r].blocks
                 for b in group if b is not None]
        assert [(p.kind, p.large_page, p.index) for p in pages] == [
            ("gemma/g0", 0, 0), ("gemma/g0", 0, 1), ("gemma/g0", 0, 2),
            ("gemma/g1", 1, 0), ("gemma/g1", 1, 1), ("gemma/g1", 1, 2),
            ("smol/g0", 2, 0), ("smol/g0", 2, 1), ("smol/g0", 2, 2)]
        assert pool.num_held("kv") == 72
        assert gemma.num_available_chunks() == smol.num_available_chunks() == 0
        assert not smol.grow("s", 16) and smol.chunks_to_grow("s", 16) == 24  # a 4th page: a new large page
        gemma.free("g")  # nothing was committed: both of gemma's large pages go back to the pool
        assert pool.num_held("kv") == 24 and smol.grow("s", 16)
        assert {k: (t.num_large_pages, t.num_pages_used) for k, t in balloon.telemetry().items()} == {
            "gemma/g0": (0, 0), "gemma/g1": (0, 0), "smol/g0": (2, 4)}
    finally:
        gemma.close()
        smol.close()
    assert pool.num_held("kv") == 0


def test_a_padding_balloon_gives_each_block_the_head_of_a_largest_page():
    """The pad-to-largest baseline behind the same balloon: every kind's page is 8 chunks (SMOL's block);
    a block maps only the chunks its layers need, the rest of the page is the padding's waste."""
    pool = _pool(72)
    balloon = KVBalloon(pool, page_policy="pad_to_largest")
    gemma = KVCacheManager(GEMMA, pool, torch.float32, layout="paged", balloon=balloon, owner="gemma")
    smol = KVCacheManager(SMOL, pool, torch.float32, layout="paged", balloon=balloon, owner="smol")
    alloc = balloon.allocator
    try:
        assert alloc.chunks_per_large_page == 8 and alloc.pages_per_large_page("gemma/g0") == 1
        gemma.admit("g", [1] * 5)
        assert gemma.grow("g", 5)  # two pages of each kind: four 8-chunk pages where LCM takes one 12-chunk page
        full, sliding = gemma.requests["g"].blocks
        assert [len(b.chunks) for b in (*full, *sliding)] == [4, 4, 6, 6]
        assert [b.chunks for b in full] == [alloc.large_page_chunks(b.small_page.large_page)[:4] for b in full]
        assert pool.num_held("kv") == 32 and gemma.num_available_chunks() == 40
        smol.admit("s", [2] * 20)
        assert smol.grow("s", 20) and pool.num_held("kv") == 72  # 5 SMOL pages: the pool is full
        assert not gemma.grow("g", 9)
    finally:
        gemma.close()
        smol.close()
    assert pool.num_held("kv") == 0


NAMES = ("a", "b", "c")


class SharedBalloonMachine(RuleBasedStateMachine):
    """Two paged managers (coprime-ish kinds: 4, 6 and 8 chunks) and the activations on one pool."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = _pool(72)
        self.balloon = KVBalloon(self.pool)
        self.kvs = {"gemma": KVCacheManager(GEMMA, self.pool, torch.float32, layout="paged", balloon=self.balloon,
                                            owner="gemma"),
                    "smol": KVCacheManager(SMOL, self.pool, torch.float32, layout="paged", balloon=self.balloon,
                                           owner="smol")}
        self.tokens: dict[tuple[str, str], int] = {}
        self.activations: list = []

    def teardown(self) -> None:
        for kv in self.kvs.values():
            kv.close()
        assert self.pool.num_held("kv") == 0

    @rule(model=st.sampled_from(("gemma", "smol")), name=st.sampled_from(NAMES), prompt=st.integers(0, 2),
          num=st.integers(1, 20))
    def admit_or_grow(self, model, name, prompt, num):
        kv = self.kvs[model]
        key = (model, name)
        if key not in self.tokens:
            if not kv.num_free_slots:
                return
            self.tokens[key] = kv.admit(name, [prompt] * 31)  # three distinct prompts: prefix hits
        end = min(self.tokens[key] + num, 31)
        fits = kv.chunks_to_grow(name, end) <= kv.num_available_chunks()
        assert kv.grow(name, end) == fits
        if fits:
            kv.commit(name, [prompt] * 31, end)
            self.tokens[key] = end

    @rule(model=st.sampled_from(("gemma", "smol")), name=st.sampled_from(NAMES))
    def free(self, model, name):
        if (model, name) in self.tokens:
            self.kvs[model].free(name)
            del self.tokens[(model, name)]

    @rule(count=st.integers(1, 30))
    def activations_take(self, count):
        if self.pool.can_inflate("activations", count):
            self.activations.extend(self.pool.inflate("activations", count))

    @rule()
    def activations_give_back(self):
        self.pool.deflate("activations", self.activations)
        self.activations = []

    @invariant()
    def every_small_page_in_one_place_and_empty_large_pages_gone(self):
        alloc = self.balloon.allocator
        assert self.pool.num_held("kv") + self.pool.num_held("activations") + self.pool.num_free() == 72
        assert self.pool.num_held("kv") == len(alloc._large) * alloc.chunks_per_large_page
        pages = []
        evictable = 0
        for kv in self.kvs.values():
            live = {b.block_id: b for s in kv.requests.values() for g in s.blocks for b in g if b is not None}
            cached = dict(kv.prefix.evictable)
            assert not live.keys() & cached.keys()
            pages += [b.small_page for b in (*live.values(), *cached.values())]
            evictable += len(cached)
        assert len(set(pages)) == len(pages) == len(alloc._used)  # no page in two blocks, none leaked
        assert evictable == len(alloc._evictable)
        for large in alloc._large.values():
            assert 0 < large.used == alloc.pages_per_large_page(large.kind) - len(large.free)
        reclaimable = sum(large.used == large.evictable for large in alloc._large.values())
        assert alloc.num_reclaimable_chunks() == reclaimable * alloc.chunks_per_large_page


TestSharedBalloonMachine = SharedBalloonMachine.TestCase
TestSharedBalloonMachine.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


def test_a_prefix_hit_is_not_counted_as_room_once_it_is_held():
    """Admission counts a hit's cached pages as already there; they must not also count as room (their large
    pages stop being reclaimable once held). Counting them twice let a tight two-model pool admit a request
    and then fail its step's workspace (PoolExhausted)."""
    pool = _pool(24)
    kv = KVCacheManager(SMOL, pool, torch.float32, layout="paged")
    try:
        assert kv.blocks.allocator.chunks_per_large_page == 8  # one block a large page
        prompt = list(range(9))
        kv.admit("a", prompt)
        assert kv.grow("a", 9)
        kv.commit("a", prompt, 9)
        kv.free("a")  # pages 0 and 1 cached (two reclaimable large pages), the partial page 2 went back
        assert pool.num_held("kv") == 16 and kv.num_available_chunks() == 24
        again = [*range(8), 99, 98]
        assert kv.match_prefix(again) == 8
        hit = kv.hit_blocks(again, 8)
        assert [block.page for block in hit] == [0, 1]
        assert kv.num_available_chunks(hit) == 8  # what is left once the hit is held
        kv.admit("b", again)
        assert kv.num_available_chunks() == 8
    finally:
        kv.close()
