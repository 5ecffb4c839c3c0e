"""Jenga's allocator variants as page policies (memory/page_policies.py), through the KVBalloon two KV
managers share: padding follows the largest kind registered so far, a padded page's data is its first
chunks, a static partition caps each kind and the managers' admission checks see the cap."""

from __future__ import annotations

import pytest
import torch

from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup
from memory.kv.balloon import KVBalloon
from memory.lcm_allocator import LcmAllocator
from memory.page_policies import PAGE_POLICIES, PadToLargest, StaticPartition, create_page_policy

PAGE = 4
CHUNK = PAGE * 256 * 4


def _spec(groups, num_layers):
    return KVCacheSpec(num_layers=num_layers, num_kv_heads=1, head_dim=256, dtype_bytes=4, groups=groups,
                       max_slots=4, max_len=PAGE * 8, tokens_per_page=PAGE)


GEMMA = _spec((LayerGroup((0, 1), None), LayerGroup((2, 3, 4), 2 * PAGE)), 5)  # blocks of 4 and 6 chunks
SMOL = _spec((LayerGroup((0, 1, 2, 3), None),), 4)  # blocks of 8 chunks


def _pool(num_chunks):
    return ElasticPool(create_backend("sim", granularity=CHUNK), num_chunks * CHUNK, CHUNK)


def test_registry_names_the_three_variants():
    assert set(PAGE_POLICIES) == {"lcm", "pad_to_largest", "static_partition"}
    assert isinstance(create_page_policy("pad_to_largest"), PadToLargest)
    with pytest.raises(ValueError, match="unknown page policy"):
        create_page_policy("buddy")
    with pytest.raises(ValueError):
        StaticPartition({"a": 0.7, "b": 0.6})


def test_padding_through_a_shared_balloon_pads_to_the_largest_kind_of_both_managers():
    pool = _pool(96)
    balloon = KVBalloon(pool, page_policy="pad_to_largest")
    gemma = KVCacheManager(GEMMA, pool, torch.float32, layout="paged", balloon=balloon, owner="gemma")
    alloc = balloon.allocator
    assert alloc.allocated_page_bytes == {"gemma/g0": 6 * CHUNK, "gemma/g1": 6 * CHUNK}
    smol = KVCacheManager(SMOL, pool, torch.float32, layout="paged", balloon=balloon, owner="smol")
    try:
        assert set(alloc.allocated_page_bytes.values()) == {8 * CHUNK} and alloc.chunks_per_large_page == 8
        gemma.admit("g", [1] * 5)
        assert gemma.grow("g", 5)  # 2 pages of each kind: 4 padded 8-chunk pages
        full = gemma.requests["g"].blocks[0]
        large = alloc.large_page_chunks(full[0].small_page.large_page)
        assert full[0].chunks == large[:4]  # the data sits in the first 4 chunks; 4 are padding
        t = gemma.kind_telemetry()
        assert (t["gemma/g0"].bytes_held, t["gemma/g0"].bytes_used) == (16 * CHUNK, 8 * CHUNK)
        assert pool.num_held("kv") == 32 and smol.chunks_to_grow(None, 5) == 16
        with pytest.raises(ValueError, match="resize"):
            alloc.register({"big": 12 * CHUNK})  # would re-pad kinds that hold pages
        gemma.free("g")
        assert pool.num_held("kv") == 0
    finally:
        gemma.close()
        smol.close()


def test_static_partition_caps_each_kind_and_admission_sees_the_cap():
    pool = _pool(96)
    shares = {"gemma/g0": 0.25, "gemma/g1": 0.25, "smol/g0": 0.5}
    balloon = KVBalloon(pool, page_policy=StaticPartition(shares, budget_chunks=96))
    gemma = KVCacheManager(GEMMA, pool, torch.float32, layout="paged", balloon=balloon, owner="gemma")
    smol = KVCacheManager(SMOL, pool, torch.float32, layout="paged", balloon=balloon, owner="smol")
    alloc = balloon.allocator
    try:
        assert alloc.chunks_per_large_page == 24  # lcm(4, 6, 8)
        assert alloc.max_large_pages == {"gemma/g0": 1, "gemma/g1": 1, "smol/g0": 2}  # of 4 large pages
        smol.admit("s", [2] * 24)
        assert smol.grow("s", 24)  # 6 pages of 8 chunks: both of its large pages
        assert smol.chunks_to_grow("s", 28) > pool.num_chunks  # a 7th page is beyond its share
        assert not smol.can_grow("s", 28) and pool.num_free() == 48  # though half the pool is free
        assert gemma.can_grow(None, 20)
    finally:
        gemma.close()
        smol.close()


def test_the_classmethod_variants_are_the_policies():
    pool = _pool(60)
    assert LcmAllocator.pad_to_largest(pool, "a", {"x": CHUNK, "y": 3 * CHUNK}).policy_name == "pad_to_largest"
    assert LcmAllocator.static_partition(pool, "b", {"x": CHUNK}, {"x": 1.0}).policy_name == "static_partition"
    assert LcmAllocator(pool, "c", {"x": CHUNK}).policy_name == "lcm"
