"""The `paged` KV layout's bookkeeping with exact page indices: a block is mapped once however many
slots share it, moving a request rewrites its table row, pages left (or slid out of a window) point
at the null page, and data written through the table reads back; swap round-trips through it."""

from __future__ import annotations

import torch

from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup
from memory.kv.paged import NULL_PAGE

PAGE = 4


def _paged_kv(window: int | None = None, host: bool = False) -> tuple[KVCacheManager, ElasticPool]:
    groups = (LayerGroup((0, 1), None),) if window is None else (LayerGroup((0,), None), LayerGroup((1,), window))
    spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=256, dtype_bytes=4, groups=groups, max_slots=3,
                       max_len=PAGE * 4, tokens_per_page=PAGE)  # pages of 4 x 2 x 256 x 4 B = 8 KiB
    pool = ElasticPool(create_backend("host"), 64 * spec.page_bytes, spec.page_bytes)
    buffer = HostBuffer(16 * spec.page_bytes, spec.page_bytes, "cpu") if host else None
    return KVCacheManager(spec, pool, torch.float32, layout="paged", host_buffer=buffer), pool


def _row(kv: KVCacheManager, group: int, request: str) -> list[int]:
    return kv.layout.tables[group][kv.slot_of(request)].tolist()


def test_pages_get_indices_and_shared_blocks_map_once():
    kv, pool = _paged_kv()
    try:
        prompt = list(range(10))
        assert kv.admit("a", prompt) == 0 and kv.grow("a", 10)
        assert _row(kv, 0, "a") == [1, 2, 3, NULL_PAGE]  # three pages, lowest free indices first
        kv.commit("a", prompt, 10)  # pages 0 and 1 are full: shareable
        assert kv.admit("b", prompt) == 8 and kv.grow("b", 10)
        assert _row(kv, 0, "b") == [1, 2, 4, NULL_PAGE]  # the shared blocks' pages, then its own
        k0 = kv.layout.tensors[0][0]
        assert k0.chunk_at(1).num_mappings == 1  # shared by two slots, mapped once
        assert pool.num_held("kv") == 4 * 4  # 4 blocks x 2 layers x (K, V)
        kv.free("a")  # slot 0 opens: b moves into it by rewriting the table row
        assert kv.slot_of("b") == 0 and _row(kv, 0, "b") == [1, 2, 4, NULL_PAGE]
        assert kv.layout.tables[0][1].tolist() == [NULL_PAGE] * 4
        assert not k0.is_mapped(3)  # a's private page went back to the pool
        kv.free("b")
        assert [k0.is_mapped(i) for i in range(5)] == [False] * 5  # cached blocks are unmapped too
        assert kv.prefix.num_evictable_chunks == 2 * 4
    finally:
        kv.close()


def test_tokens_written_through_the_table_read_back():
    kv, _ = _paged_kv()
    try:
        kv.admit("a", [1]), kv.admit("b", [2])
        assert kv.grow("a", 9) and kv.grow("b", 6)
        layers = [(torch.randn(6, 2, 256), torch.randn(6, 2, 256)) for _ in range(2)]
        kv.write_kv("b", 0, layers)
        pages = kv.layout.layer_caches()[1][0]
        row = pages.block_table[kv.slot_of("b")]
        assert torch.equal(pages.pages[row[1], 1], layers[1][0][5])  # token 5 = page 1, offset 1
        read = kv.read_kv("b", 2, 6)
        assert all(torch.equal(got[0], want[0][2:6]) and torch.equal(got[1], want[1][2:6])
                   for got, want in zip(read, layers, strict=True))
    finally:
        kv.close()


def test_sliding_pages_point_at_the_null_page_and_swap_round_trips():
    kv, _ = _paged_kv(window=5, host=True)
    try:
        kv.admit("a", [1])
        assert kv.grow("a", 14)
        # the window (5) of the next query keeps tokens 9.. : the sliding layer maps pages 2 and 3 only
        assert _row(kv, 0, "a") == [1, 2, 3, 4] and _row(kv, 1, "a") == [NULL_PAGE, NULL_PAGE, 5, 6]
        layers = [(torch.randn(6, 2, 256), torch.randn(6, 2, 256)) for _ in range(2)]
        kv.write_kv("a", 8, layers)  # tokens 8..13: the pages both groups hold
        kv.commit("a", list(range(14)), 14)
        kv.swap_out("a")
        assert kv.layout.tables[1][0].tolist() == [NULL_PAGE] * 4
        assert kv.swap_in("a")
        assert _row(kv, 0, "a") == [1, 2, 3, 4] and _row(kv, 1, "a") == [NULL_PAGE, NULL_PAGE, 5, 6]
        read = kv.read_kv("a", 8, 14)
        assert all(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
                   for got, want in zip(read, layers, strict=True))
    finally:
        kv.close()
