"""KVCacheManager bookkeeping with exact ids: slots stay packed, shared prefix pages are the same
physical chunks, freed pages go straight back to the pool, cached pages are evicted LRU-first and
given to other balloons, swap round-trips data. Runs at GPU scale on the `sim` backend."""

from __future__ import annotations

import pytest
import torch

from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup


def _spec(page_tokens: int, bytes_per_element: int, kv_heads: int, head_dim: int, layers: int = 2,
          slots: int = 4, max_len: int | None = None, window: int | None = None) -> KVCacheSpec:
    groups = (LayerGroup(tuple(range(layers)), None),) if window is None else (
        LayerGroup((0,), None), LayerGroup(tuple(range(1, layers)), window))
    return KVCacheSpec(num_layers=layers, num_kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=bytes_per_element,
                       groups=groups, max_slots=slots, max_len=max_len or page_tokens * 8, tokens_per_page=page_tokens)


@pytest.fixture
def sim_kv():
    """A 70B-like layout on an 80 GB simulated device: 2 MiB pages of 1,024 tokens (8 KV heads x 128)."""
    spec = _spec(1024, 2, kv_heads=8, head_dim=128, layers=2, slots=4)
    pool = ElasticPool(create_backend("sim"), 80 << 30, spec.page_bytes)
    pool.register("activations")
    kv = KVCacheManager(spec, pool, torch.bfloat16)
    yield kv, pool
    kv.close()


def _chunk_ids(kv: KVCacheManager, request_id: str) -> list[int]:
    return [chunk.chunk_id for pages in kv.requests[request_id].blocks for block in pages if block
            for chunk in block.chunks]


def test_pages_come_and_go_with_tokens(sim_kv):
    kv, pool = sim_kv
    assert kv.admit("a", list(range(10))) == 0 and kv.slot_of("a") == 0
    assert kv.grow("a", 1025)  # two pages x 2 layers x (K, V)
    assert pool.num_held("kv") == 2 * 4 == kv.num_used_chunks()
    kv.free("a")
    assert pool.num_held("kv") == 0  # not committed, so nothing cached: straight back to the pool


def test_slots_stay_packed_and_moves_keep_chunks(sim_kv):
    kv, _ = sim_kv
    for name in "abc":
        kv.admit(name, [ord(name)] * 5)
        assert kv.grow(name, 100)
    chunks_of_c = _chunk_ids(kv, "c")
    kv.free("a")  # slot 0 opens: the last slot's request moves into it, its pages remapped
    assert kv.slots.requests == ["c", "b"] and kv.slot_of("c") == 0
    assert _chunk_ids(kv, "c") == chunks_of_c  # same physical chunks, no copy
    layer_k = kv.layout.tensors[0][0]
    assert layer_k.chunk_at(0).chunk_id == chunks_of_c[0]
    assert not layer_k.is_mapped(2 * kv.spec.pages_per_slot)  # slot 2 is empty now


def test_prefix_pages_are_shared_then_cached_then_evicted(sim_kv):
    kv, pool = sim_kv
    prompt = list(range(3000))
    kv.admit("a", prompt)
    assert kv.grow("a", 3000)
    kv.commit("a", prompt, 3000)  # two full pages become shareable
    assert kv.match_prefix(prompt) == 2048
    assert kv.admit("b", prompt) == 2048
    shared = _chunk_ids(kv, "b")
    assert shared == _chunk_ids(kv, "a")[: len(shared)]  # the very same physical chunks
    shared_blocks = [block for pages in kv.requests["b"].blocks for block in pages]
    assert all(chunk.num_mappings == 2 for block in shared_blocks for chunk in block.chunks)
    kv.free("a")
    kv.free("b")
    assert kv.num_used_chunks() == 0 and kv.prefix.num_evictable_chunks == 2 * 4 == pool.num_held("kv")
    # another balloon needs the memory: the pool reclaims the cached pages (LRU)
    everything = pool.num_chunks - pool.num_held("kv")
    pool.inflate("activations", everything + 4)
    assert kv.prefix.num_evictable_chunks == 4 and kv.match_prefix(prompt) == 0  # the first page went first


def test_a_static_kv_share_at_its_limit_evicts_its_cache_while_other_shares_idle():
    """Static split: KV holds its whole share (cached pages), the activation share is free. A new page
    must come from KV's own cache: the free chunks of the idle activation share are not KV's to take."""
    spec = _spec(1024, 2, kv_heads=8, head_dim=128, layers=2, slots=4)
    pool = ElasticPool(create_backend("sim"), 16 * spec.page_bytes, spec.page_bytes, "static",
                       static_split={"kv": 8, "activations": 8})
    pool.register("activations")
    kv = KVCacheManager(spec, pool, torch.bfloat16)
    prompt = list(range(2 * 1024))
    kv.admit("a", prompt)
    assert kv.grow("a", 2048)
    kv.commit("a", prompt, 2048)
    kv.free("a")
    assert pool.num_held("kv") == 8 == kv.prefix.num_evictable_chunks and pool.num_free() == 8
    kv.admit("b", [7] * 10)
    assert kv.grow("b", 1024)  # 4 chunks: evicted from KV's cache, not inflated past its share
    assert pool.num_held("kv") == 8 and kv.prefix.num_evictable_chunks == 4 and pool.num_free() == 8
    kv.free("b")
    kv.close()


def test_sliding_window_pages_leave_the_window(sim_kv):
    spec = _spec(1024, 2, kv_heads=8, head_dim=128, layers=3, window=1500)
    pool = ElasticPool(create_backend("sim"), 8 << 30, spec.page_bytes)
    kv = KVCacheManager(spec, pool, torch.bfloat16)
    kv.admit("a", [1] * 10)
    assert kv.grow("a", 4000)
    kv.commit("a", [1] * 4000, 4000)
    full, sliding = kv.requests["a"].blocks
    assert all(block is not None for block in full) and len(full) == 4
    assert sliding[:2] == [None, None] and all(sliding[2:])  # keys < 4000 - 1500 are gone
    assert pool.num_held("kv") == 4 * 2 + 2 * 4  # full: 4 pages x 1 layer; sliding: 2 pages x 2 layers
    kv.close()


def test_swap_round_trip_keeps_data():
    backend = create_backend("host")
    spec = _spec(32, 4, kv_heads=2, head_dim=16, layers=2, slots=2)  # 4 KiB pages
    pool = ElasticPool(backend, 64 * spec.page_bytes, spec.page_bytes)
    host = HostBuffer(64 * spec.page_bytes, spec.page_bytes)
    kv = KVCacheManager(spec, pool, torch.float32, host_buffer=host)
    try:
        kv.admit("a", [1] * 5)
        assert kv.grow("a", 70)
        keys, values = kv.layer_caches()[1]
        keys[kv.slot_of("a"), :70] = torch.arange(70 * 32, dtype=torch.float32).view(70, 2, 16)
        before = keys[0, :70].clone()
        assert kv.can_swap_out("a")
        assert kv.swap_out("a") == 3 * 4 * spec.page_bytes and pool.num_held("kv") == 0
        assert kv.swap_in("a")
        assert torch.equal(kv.layer_caches()[1][0][kv.slot_of("a"), :70], before)
        assert host.num_free == 64
    finally:
        kv.close()
        pool.close()


def _assert_host_exact(kv: KVCacheManager, host: HostBuffer) -> None:
    held = kv.host_slots_held()
    assert len(held) == len(set(held)) == host.num_slots - host.num_free  # each allocated slot held once


def test_swapping_again_and_again_frees_each_host_slot_once():
    """Re-swaps (out, in, out, ...) of two requests, then freeing one while swapped: after every operation the
    allocated host slots are exactly those the requests hold; swapping out twice, or in a request that is not
    out, is refused without touching the buffer (a second swap-out would lose the first copy's slots)."""
    spec = _spec(32, 4, kv_heads=2, head_dim=16, layers=2, slots=2)  # 4 KiB pages
    pool = ElasticPool(create_backend("host"), 64 * spec.page_bytes, spec.page_bytes)
    host = HostBuffer(64 * spec.page_bytes, spec.page_bytes)
    kv = KVCacheManager(spec, pool, torch.float32, host_buffer=host)
    try:
        for request_id, num_tokens in (("a", 70), ("b", 40)):
            kv.admit(request_id, [1] * 5)
            assert kv.grow(request_id, num_tokens)
        keys = kv.layer_caches()[1][0]
        keys[kv.slot_of("a"), :70] = torch.arange(70 * 32, dtype=torch.float32).view(70, 2, 16)
        before = keys[kv.slot_of("a"), :70].clone()
        for _ in range(3):
            kv.swap_out("a")
            _assert_host_exact(kv, host)
            with pytest.raises(RuntimeError, match="already swapped"):
                kv.swap_out("a")
            kv.swap_out("b")
            assert host.num_free == 64 - (3 + 2) * 4
            assert kv.swap_in("b") and kv.swap_in("a")
            with pytest.raises(RuntimeError, match="not swapped"):
                kv.swap_in("a")
            _assert_host_exact(kv, host)
            assert host.num_free == 64
            assert torch.equal(kv.layer_caches()[1][0][kv.slot_of("a"), :70], before)
        kv.swap_out("b")
        kv.free("b")  # aborted while on the host
        _assert_host_exact(kv, host)
        kv.free("a")
        assert host.num_free == 64 and pool.num_held("kv") == 0
    finally:
        kv.close()
        pool.close()
