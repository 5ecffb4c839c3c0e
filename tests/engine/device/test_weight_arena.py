"""WeightArena: each layer on its own pages, a host copy, drop/restore with exact pool accounting."""

from __future__ import annotations

import os

import pytest
import torch

from engine.device.weight_arena import SHARED, WEIGHTS_CLIENT, WeightArena, measure_segments
from memory import ElasticPool, PoolExhausted, create_backend

PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK = 4 * PAGE


@pytest.fixture
def host():
    backend = create_backend("host")
    yield backend
    backend.close()


def tensors() -> dict[int | None, list[torch.Tensor]]:
    """Shared tensors and three layers; layer 1 spans three chunks, the others one or two."""
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=generator)

    return {SHARED: [rand(100)], 0: [rand(CHUNK // 4 - 4), rand(8)], 1: [rand(2 * CHUNK // 4 + 10)], 2: [rand(5)]}


def build(allocate):
    return {key: [allocate(t, key) for t in group] for key, group in tensors().items()}


def make(pool_chunks: int, host) -> tuple[ElasticPool, WeightArena, dict]:
    pool = ElasticPool(host, pool_chunks * CHUNK, CHUNK)
    arena = WeightArena(pool, measure_segments(build), keep_host_copy=True)
    placed = build(arena.place)
    arena.seal()
    return pool, arena, placed


def test_layers_sit_on_their_own_pages(host):
    pool, arena, placed = make(16, host)
    # shared: 1 chunk; layer 0: CHUNK-16 bytes, aligned to CHUNK, then 32 bytes -> 2 chunks; layer 1: 3; layer 2: 1
    assert {key: segment.num_mapped for key, segment in arena.segments.items()} == {SHARED: 1, 0: 2, 1: 3, 2: 1}
    assert pool.num_held(WEIGHTS_CLIENT) == 7
    assert arena.host.used_bytes == 6 * CHUNK  # layers only: the shared tensors are never dropped
    pages = {key: {t.data_ptr() // CHUNK for t in group} for key, group in placed.items()}
    for a in pages:
        for b in pages:
            assert a == b or not pages[a] & pages[b]
    arena.close()
    pool.close()


def test_drop_frees_exact_chunks_and_restore_copies_back(host):
    pool, arena, placed = make(10, host)
    expected = tensors()
    pointers = [t.data_ptr() for group in placed.values() for t in group]
    assert pool.num_free() == 3
    assert arena.drop_layers(range(0, 2)) == 5
    assert arena.dropped_layers == {0, 1} and arena.dropped_bytes == 5 * CHUNK
    telemetry = pool.telemetry()
    assert telemetry.chunks_per_client == {WEIGHTS_CLIENT: 2} and telemetry.num_free_chunks == 8
    pool.register("kv")
    kv_chunks = pool.inflate("kv", 8)  # the freed chunks are KV's at once
    with pytest.raises(PoolExhausted):  # all or nothing: KV holds the memory
        arena.restore_layers(range(0, 2))
    assert arena.dropped_layers == {0, 1} and pool.num_held(WEIGHTS_CLIENT) == 2
    pool.deflate("kv", kv_chunks[:5])
    assert arena.restore_layers(range(0, 2)) == 5
    assert arena.dropped_layers == frozenset() and pool.num_held(WEIGHTS_CLIENT) == 7
    assert [t.data_ptr() for group in placed.values() for t in group] == pointers
    for key, group in placed.items():
        for got, want in zip(group, expected[key], strict=True):
            assert torch.equal(got, want)
    assert arena.drop_layers([2]) == 1 and arena.drop_layers([2]) == 0  # dropping twice frees nothing more
    assert (arena.num_drops, arena.num_restores) == (2, 1)
    with pytest.raises(ValueError, match="not decoder layers"):
        arena.drop_layers([3])
    arena.close()
    assert pool.telemetry().chunks_per_client == {WEIGHTS_CLIENT: 0, "kv": 3}
    pool.deflate("kv", kv_chunks[5:])
    pool.close()


def test_without_host_copy_nothing_drops(host):
    pool = ElasticPool(host, 16 * CHUNK, CHUNK)
    arena = WeightArena(pool, measure_segments(build))
    build(arena.place)
    arena.seal()
    with pytest.raises(RuntimeError, match="no host copy"):
        arena.drop_layers([0])
    arena.close()
    pool.close()
