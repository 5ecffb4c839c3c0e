"""Layer-wise KV residency with exact counts: which layers' pages are on the device and which on the
host after scripted admit / grow / demote / promote / swap / free / abort, that data survives every
move, and that nothing leaks (pool and host buffer back to zero)."""

from __future__ import annotations

import pytest
import torch

from memory import ElasticPool, HostBuffer
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup

PAGE_TOKENS = 16
HEAD_DIM = 64  # fp32, one kv head: 256 B a token, 4 KiB a page


def _spec(layers: int = 4, window: int | None = None) -> KVCacheSpec:
    groups = (LayerGroup(tuple(range(layers)), None),) if window is None else (
        LayerGroup((0, 1), None), LayerGroup(tuple(range(2, layers)), window))
    return KVCacheSpec(num_layers=layers, num_kv_heads=1, head_dim=HEAD_DIM, dtype_bytes=4, groups=groups,
                       max_slots=4, max_len=PAGE_TOKENS * 8, tokens_per_page=PAGE_TOKENS)


@pytest.fixture
def kv_env(host):
    def build(num_chunks: int = 64, host_pages: int = 64, window: int | None = None):
        spec = _spec(window=window)
        host_buffer = HostBuffer(host_pages * spec.page_bytes, spec.page_bytes)
        pool = ElasticPool(host, num_chunks * spec.page_bytes, spec.page_bytes, host_buffer=host_buffer)
        kv = KVCacheManager(spec, pool, torch.float32, host_buffer=host_buffer)
        built.append(kv)
        return kv, pool, host_buffer

    built: list[KVCacheManager] = []
    yield build
    for kv in built:
        kv.close()


def fill(kv: KVCacheManager, request_id: str, start: int, end: int) -> None:
    """Writes a value per (request, layer, K/V, token) wherever the token's page lives."""
    state = kv.requests[request_id]
    slot = kv.slot_of(request_id)
    for layer in range(kv.spec.num_layers):
        for position in range(start, end):
            page, offset = divmod(position, PAGE_TOKENS)
            for which in (0, 1):
                value = expected(request_id, layer, which, position)
                host = state.host_pages.get((layer, page))
                if host is None:
                    kv.layout.tensors[layer][which].tensor[slot, position].fill_(value)
                else:
                    view = kv.host_buffer.view(host[which]).view(torch.float32).view(PAGE_TOKENS, 1, HEAD_DIM)
                    view[offset].fill_(value)


def expected(request_id: str, layer: int, which: int, position: int) -> float:
    return float(ord(request_id[0]) * 1000 + layer * 100 + which * 50 + position % 50)


def check(kv: KVCacheManager, request_id: str, end: int) -> None:
    layers = kv.read_kv(request_id, 0, end)
    for layer, pair in enumerate(layers):
        for which, tensor in enumerate(pair):
            want = torch.tensor([expected(request_id, layer, which, p) for p in range(end)])
            assert torch.equal(tensor[:, 0, 0], want), (request_id, layer, which)


def test_admit_with_layers_on_the_host_then_demote_promote_free(kv_env):
    kv, pool, host = kv_env()
    assert kv.chunks_to_grow(None, 40, offloaded=(2, 3)) == 3 * 2 * 2  # 3 pages x layers 0,1 x (K, V)
    assert kv.host_chunks_to_grow(None, 40, offloaded=(2, 3)) == 12
    kv.admit("a", [1] * 40, offloaded=(2, 3))
    assert kv.grow("a", 40)
    assert kv.layer_chunk_counts("a") == [(6, 0), (6, 0), (0, 6), (0, 6)]
    assert pool.num_held("kv") == 12 and host.used_bytes == 12 * kv.spec.page_bytes
    assert kv.offloaded_layers("a") == (2, 3) and kv.offloaded_requests_per_layer() == [0, 0, 1, 1]
    fill(kv, "a", 0, 40)
    check(kv, "a", 40)

    assert kv.chunks_freed_by_demoting("a", 1) == 6
    assert kv.demote("a", 1) == 6
    assert kv.layer_chunk_counts("a") == [(6, 0), (0, 6), (0, 6), (0, 6)]
    assert pool.num_held("kv") == 6 and kv.num_offloaded_host_chunks == 18
    check(kv, "a", 40)

    assert kv.chunks_to_promote("a", 3) == 6 and kv.promote("a", 3)
    assert kv.layer_chunk_counts("a") == [(6, 0), (0, 6), (0, 6), (6, 0)]
    assert kv.offloaded_layers("a") == (1, 2)
    check(kv, "a", 40)
    assert kv.grow("a", 49)  # a fourth page: device for layers 0 and 3, host for 1 and 2
    assert kv.layer_chunk_counts("a") == [(8, 0), (0, 8), (0, 8), (8, 0)]
    fill(kv, "a", 40, 49)
    check(kv, "a", 49)
    kv.free("a")
    assert pool.num_held("kv") == 0 and host.used_bytes == 0 and kv.num_offloaded_host_chunks == 0


def test_partial_request_swaps_out_whole_and_comes_back_on_the_device(kv_env):
    kv, pool, host = kv_env()
    kv.admit("b", [2] * 30, offloaded=(0,))
    assert kv.grow("b", 30)
    fill(kv, "b", 0, 30)
    assert kv.layer_chunk_counts("b") == [(0, 4), (4, 0), (4, 0), (4, 0)]
    kv.swap_out("b")
    assert pool.num_held("kv") == 0 and host.used_bytes == 16 * kv.spec.page_bytes
    assert kv.requests["b"].host_pages == {}
    assert kv.chunks_to_swap_in("b") == 16 and kv.swap_in("b")
    assert kv.layer_chunk_counts("b") == [(4, 0)] * 4 and host.used_bytes == 0
    check(kv, "b", 30)
    kv.free("b")
    assert pool.num_held("kv") == 0


def test_shared_prefix_pages_stay_on_the_device_and_partial_blocks_are_not_cached(kv_env):
    kv, pool, host = kv_env()
    prompt = [7] * 40
    kv.admit("a", prompt)
    assert kv.grow("a", 40)
    kv.commit("a", prompt, 40)  # two full pages are cache entries now
    assert kv.admit("b", prompt, offloaded=(3,)) == 32
    assert kv.grow("b", 41)
    assert kv.layer_chunk_counts("b") == [(6, 0), (6, 0), (6, 0), (4, 2)]  # 2 shared pages + 1 host page
    assert kv.demote("b", 2) == 2  # only its private third page moves
    assert kv.layer_chunk_counts("b") == [(6, 0), (6, 0), (4, 2), (4, 2)]
    assert kv.demote("a", 0) == 2  # the shared pages stay; a's own third page goes
    kv.commit("b", prompt + [7], 41)
    assert len(kv.prefix.by_hash) == 2  # b's partial third page did not become a cache entry
    kv.free("a")  # abort
    kv.free("b")
    assert kv.num_used_chunks() == 0 and host.used_bytes == 0
    assert pool.num_held("kv") == kv.prefix.num_evictable_chunks == 16


def test_growth_fails_whole_when_the_host_buffer_is_full(kv_env):
    kv, pool, host = kv_env(host_pages=4)
    kv.admit("c", [3] * 40, offloaded=(2, 3))
    assert not kv.grow("c", 40)  # needs 12 host slots, 4 exist
    assert pool.num_held("kv") == 0 and host.used_bytes == 0
    assert kv.grow("c", 16)
    assert kv.layer_chunk_counts("c") == [(2, 0), (2, 0), (0, 2), (0, 2)]
    with pytest.raises(MemoryError):
        kv.demote("c", 0)  # no host room: nothing changes
    assert kv.layer_chunk_counts("c") == [(2, 0), (2, 0), (0, 2), (0, 2)]
    kv.free("c")
    assert pool.num_held("kv") == 0 and host.used_bytes == 0


def test_sliding_window_pages_leave_the_host_too(kv_env):
    kv, pool, host = kv_env(window=16)
    kv.admit("d", [4] * 60, offloaded=(3,))
    assert kv.grow("d", 20)
    kv.commit("d", [4] * 60, 20)
    assert kv.grow("d", 60)
    assert kv.layer_chunk_counts("d") == [(8, 0), (8, 0), (8, 0), (0, 8)]
    kv.commit("d", [4] * 60, 60)  # the window keeps pages 2 and 3 of the sliding group
    assert kv.layer_chunk_counts("d") == [(8, 0), (8, 0), (4, 0), (0, 4)]
    kv.free("d")
    assert pool.num_held("kv") == kv.prefix.num_evictable_chunks and host.used_bytes == 0


def test_import_with_layers_on_the_host_writes_reads_and_frees_exactly(kv_env):
    """Migration's destination: a reservation with its top layers on the host (every page of them in the
    host buffer, nothing of them in the pool); staged copies written through `write_kv` read back whole;
    a reservation the host cannot take is refused with nothing held; free gives everything back."""
    source, _, _ = kv_env()
    source.admit("m", [1] * 40)
    assert source.grow("m", 40)
    fill(source, "m", 0, 40)
    kv, pool, host = kv_env(num_chunks=16, host_pages=16)
    assert not kv.reserve_import("m", 48, offloaded=(1, 2, 3))  # 3 pages x 3 layers x (K, V) = 18 host pages > 16
    assert pool.num_held("kv") == 0 and host.used_bytes == 0 and not kv.requests and kv.slots.num_used == 0
    assert kv.reserve_import("m", 48, offloaded=(2, 3))
    assert kv.layer_chunk_counts("m") == [(6, 0), (6, 0), (0, 6), (0, 6)]
    assert pool.num_held("kv") == 12 and host.used_bytes == 12 * kv.spec.page_bytes
    for start, end in ((0, 20), (20, 40)):  # staged copies, one across a page boundary
        kv.write_kv("m", start, source.read_kv("m", start, end))
    kv.finish_import("m", 40)
    check(kv, "m", 40)
    slot = kv.slot_of("m")
    assert not kv.layout.tensors[2][0].tensor[slot, :40].any()  # layer 2 went to the host, not the pool
    kv.free("m")
    assert pool.num_held("kv") == 0 and host.used_bytes == 0 and kv.num_offloaded_host_chunks == 0
