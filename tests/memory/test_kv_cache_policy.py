"""Per-kind cache policies and the prefix-subset evictor, with exact pages, hit lengths and block ids:
a full-attention group and a sliding-window group (window 2 pages) on the `sim` backend."""

from __future__ import annotations

import pytest
import torch

from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup
from memory.kv.cache_policy import FullAttentionPolicy, SlidingWindowPolicy

P = 1024  # tokens per page: 2 MiB pages of 8 KV heads x 128 x bf16


def test_policies_resident_and_hit_pages():
    full, sliding = FullAttentionPolicy(P), SlidingWindowPolicy(P, 2 * P)
    assert full.resident_pages(3 * P + 1) == range(4) and full.hit_pages(3 * P) == range(3)
    assert sliding.resident_pages(3 * P + 1) == range(1, 4)  # keys > 3P - 2P: from token P + 1
    assert sliding.hit_pages(3 * P) == range(1, 3)  # query 3P sees keys from P + 1: pages 1 and 2
    assert sliding.hit_pages(2 * P) == range(0, 2) and sliding.hit_pages(0) == range(0)
    assert SlidingWindowPolicy(P, P // 2).hit_pages(3 * P) == range(2, 3)


def _kv(evictor: str, window: int | None = 2 * P) -> tuple[KVCacheManager, ElasticPool]:
    groups = (LayerGroup((0,), None), LayerGroup((1,), window)) if window else (LayerGroup((0, 1), None),)
    spec = KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype_bytes=2, groups=groups, max_slots=4,
                       max_len=8 * P, tokens_per_page=P)
    pool = ElasticPool(create_backend("sim"), 64 * spec.page_bytes, spec.page_bytes)
    pool.register("activations")
    return KVCacheManager(spec, pool, torch.bfloat16, evictor=evictor), pool


def _cached(kv: KVCacheManager) -> list[tuple[int, int]]:
    """(group, page) of every evictable block, in block-id order."""
    return sorted((b.group, b.page) for b in kv.prefix.evictable.values())


def _run_once(kv: KVCacheManager, prompt: list[int]) -> None:
    """A chunked prefill of one page per step, then the request ends."""
    assert kv.admit("a", prompt) == 0
    for end in [*range(P, len(prompt), P), len(prompt)]:
        assert kv.grow("a", end)
        kv.commit("a", prompt, end)
    kv.free("a")


@pytest.mark.parametrize("evictor", ["lru", "prefix_subset"])
def test_sliding_models_hit_without_the_pages_that_left_the_window(evictor):
    kv, _ = _kv(evictor)
    prompt = list(range(6 * P + 1))
    _run_once(kv, prompt)
    # full attention cached pages 0..5; the sliding group cached 0..3 (dropped mid-request) and 4, 5
    assert _cached(kv) == [(0, p) for p in range(6)] + [(1, p) for p in range(6)]
    # evict the sliding pages the hit does not need: a hit of 6 pages needs only sliding pages 4 and 5
    for block in [b for b in list(kv.prefix.evictable.values()) if b.group == 1 and b.page < 4]:
        del kv.prefix.by_hash[(1, block.block_hash)]
        kv.prefix.evictable.pop(block.block_id)
    assert kv.match_prefix(prompt) == 6 * P
    assert kv.admit("b", prompt) == 6 * P
    blocks = kv.requests["b"].blocks
    assert [b is not None for b in blocks[1]] == [False] * 4 + [True] * 2  # only the window is mapped
    assert kv.match_prefix(prompt[: 5 * P + 1]) == 0  # a 5-page hit would need sliding page 3: gone
    kv.close()


def _eviction_order(evictor: str, window: int | None = 2 * P) -> tuple[list[tuple[int, int]], list[int]]:
    """Evicts one block at a time (the activations balloon reclaims); records what went and the
    prefix hit length left after each eviction."""
    kv, pool = _kv(evictor, window)
    prompt = list(range(6 * P + 1))
    _run_once(kv, prompt)
    order, hits = [], []
    taken = []
    while kv.prefix.evictable:
        before = {b.block_id: (b.group, b.page) for b in kv.prefix.evictable.values()}
        taken += pool.inflate("activations", pool.num_free() + 1)  # one more chunk than is free
        gone = [before[i] for i in before if i not in kv.prefix.evictable]
        order += gone
        hits.append(kv.match_prefix(prompt))
    pool.deflate("activations", taken)
    kv.close()
    return order, hits


def test_prefix_subset_evictor_loses_the_least_hit_length():
    order, hits = _eviction_order("prefix_subset")
    # no hit has used this release yet, so its shared boundary may be anywhere within a window (2 pages) of
    # its end: only the sliding pages no such hit needs go first (0, 1), then the tail of every kind,
    # deepest first: the cached prefix shrinks from its end, a valid hit for every kind at each length
    assert order == [(1, 0), (1, 1), (0, 5), (1, 5), (0, 4), (1, 4),
                     (0, 3), (1, 3), (0, 2), (1, 2), (0, 1), (0, 0)]
    assert hits[:6] == [6 * P, 6 * P, 5 * P, 5 * P, 4 * P, 4 * P]
    assert hits[6:] == [0] * 6  # full page 3 gone: a 3-page hit would need sliding page 1, evicted first
    lru_order, lru_hits = _eviction_order("lru")
    # LRU drops the sliding pages first too (they were parked first, while the request ran), then
    # the head of the full-attention chain
    assert lru_order[:5] == [(1, 0), (1, 1), (1, 2), (1, 3), (0, 0)]
    assert lru_hits[:4] == [6 * P] * 4 and lru_hits[4] == 0


def test_full_attention_chains_shrink_from_the_tail_not_the_head():
    order, hits = _eviction_order("prefix_subset", window=None)
    assert order == [(0, p) for p in range(5, -1, -1)]
    assert hits == [5 * P, 4 * P, 3 * P, 2 * P, P, 0]  # every eviction costs one page of hit length
    lru_order, lru_hits = _eviction_order("lru", window=None)
    assert lru_order == [(0, p) for p in range(6)] and lru_hits == [0] * 6  # the head went first


def test_a_shared_prefix_that_missed_keeps_its_window_and_free_blocks_go_first_in_every_release():
    """A (4 shared pages + its own 2) ran; its slid-out sliding pages (0-3) are gone, so B (the same 4
    pages + other ones) misses and computes them again: B's commit finds A's full pages under the same
    hashes, so B's sliding pages 0-3 count as a shared prefix (B's target hit is 4 pages). The
    prefix-subset evictor then drops what no release's target needs first, in every release (B's tail past
    its shared prefix, B's sliding pages before that prefix's window) before the target pages of the oldest
    release (A's): the shared 4-page hit survives ten evictions (looking only inside the oldest release, the
    evictor lost it at the fifth)."""
    kv, pool = _kv("prefix_subset")
    shared = list(range(4 * P))
    prompt_a = shared + list(range(10**6, 10**6 + 2 * P + 1))
    prompt_b = shared + list(range(2 * 10**6, 2 * 10**6 + 2 * P + 1))
    prompt_c = shared + [7] * P  # a third request on the shared prefix
    _run_once(kv, prompt_a)
    for block in [b for b in list(kv.prefix.evictable.values()) if b.group == 1 and b.page < 4]:
        del kv.prefix.by_hash[(1, block.block_hash)]
        kv.prefix.evictable.pop(block.block_id)
    assert kv.match_prefix(prompt_b) == 0
    _run_once(kv, prompt_b)
    release_a = min(b.release for b in kv.prefix.evictable.values())
    assert sorted((b.group, b.page) for b in kv.prefix.evictable.values() if b.reused) == [(1, p) for p in range(4)]
    assert kv.match_prefix(prompt_c) == 4 * P
    order, hits, taken = [], [], []
    while kv.prefix.evictable:
        before = {b.block_id: ("a" if b.release == release_a else "b", b.group, b.page)
                  for b in kv.prefix.evictable.values()}
        taken += pool.inflate("activations", pool.num_free() + 1)
        order += [before[i] for i in before if i not in kv.prefix.evictable]
        hits.append(kv.match_prefix(prompt_c))
    pool.deflate("activations", taken)
    kv.close()
    assert order[:10] == [("b", 0, 5), ("b", 1, 5), ("b", 0, 4), ("b", 1, 4),  # B past its shared prefix
                          ("b", 1, 0), ("b", 1, 1),  # B's sliding pages its 4-page hit does not need
                          ("a", 0, 5), ("a", 1, 5), ("a", 0, 4), ("a", 1, 4)]  # A's tail, deepest first
    assert hits[:10] == [4 * P] * 10 and hits[10] == 0  # then A's full page 3: the shared chain breaks
    assert order[10] == ("a", 0, 3)


def _block_ids(kv: KVCacheManager, request_id: str) -> list[list[int | None]]:
    return [[None if b is None else b.block_id for b in pages] for pages in kv.requests[request_id].blocks]


def _prefill(kv: KVCacheManager, request_id: str, prompt: list[int], hit: int) -> None:
    assert kv.admit(request_id, prompt) == hit
    for end in [*range(hit + P, len(prompt), P), len(prompt)]:
        assert kv.grow(request_id, end)
        kv.commit(request_id, prompt, end)


@pytest.mark.parametrize("evictor", ["lru", "prefix_subset"])
def test_exact_block_ids_of_a_hit_and_of_each_eviction_for_mixed_kinds(evictor):
    """vLLM v1 style: a full-attention group (layer 0) and a sliding group (layer 1, window 2 pages); block ids
    are handed out in grow order. A (4 pages + 1 token) runs; B shares its first 3 pages and hits them
    (the full group maps A's blocks 0, 2, 4; the sliding group only the window: A's 3, 5); C would hit the
    same 3 pages. Then one block at a time is evicted: the exact ids, and C's hit length after each."""
    kv, pool = _kv(evictor)
    a = list(range(4 * P + 1))
    b = a[: 3 * P] + list(range(10**6, 10**6 + P + 1))
    c = a[: 3 * P] + [7] * P
    _prefill(kv, "a", a, 0)
    assert _block_ids(kv, "a") == [[0, 2, 4, 6, 8], [None, None, 5, 7, 9]]  # sliding ids 1, 3 slid out
    kv.free("a")  # the partial page (8, 9) is not cached; the slid-out pages were parked first
    assert list(kv.prefix.evictable) == [1, 3, 0, 2, 4, 6, 5, 7]
    assert kv.match_prefix(b) == 3 * P
    _prefill(kv, "b", b, 3 * P)
    assert _block_ids(kv, "b") == [[0, 2, 4, 10, 12], [None, None, 5, 11, 13]]
    assert kv.requests["b"].blocks[1][1] is None  # B's hit mapped A's sliding block 3; it slid out again
    kv.free("b")
    assert list(kv.prefix.evictable) == [1, 6, 7, 3, 0, 2, 4, 10, 5, 11]
    assert kv.match_prefix(c) == 3 * P
    order, hits, taken = [], [], []
    while kv.prefix.evictable:
        before = list(kv.prefix.evictable)
        taken += pool.inflate("activations", pool.num_free() + 1)
        order += [i for i in before if i not in kv.prefix.evictable]
        hits.append(kv.match_prefix(c) // P)
    pool.deflate("activations", taken)
    kv.close()
    if evictor == "lru":  # park order: A's leftovers, then B's sliding block 3 (window of the hit): lost
        assert order == [1, 6, 7, 3, 0, 2, 4, 10, 5, 11]
        assert hits == [3, 3, 3, 0, 0, 0, 0, 0, 0, 0]
    else:  # what no target hit needs, in every release (B's private tail 10, 11: B's hit says where its
        # shared prefix ends; A's slid-out 1 stays: no hit has used A, so a hit at any page within a window of
        # A's end is kept possible), then the oldest release deepest first (A's 6, 7, 1), then B's: 4 (full
        # page 2) breaks the hit
        assert order == [10, 11, 6, 7, 1, 4, 5, 2, 3, 0]
        assert hits == [3, 3, 3, 3, 3, 0, 0, 0, 0, 0]


def test_auto_evictor_is_prefix_subset_for_sliding_kinds_only():
    kv, _ = _kv("auto")
    assert kv.evictor == "prefix_subset" and kv.prefix.evictor is not None
    kv.close()
    kv, _ = _kv("auto", window=None)
    assert kv.evictor == "lru" and kv.prefix.evictor is None
    kv.close()
    with pytest.raises(ValueError, match="unknown KV evictor"):
        _kv("fifo")
