"""ElasticPool: budget, lazy chunks, all-or-nothing inflate, policies, reclaim, trim, telemetry."""

from __future__ import annotations

import json
import os
import threading

import pytest
import torch

from memory import (
    BackendClosed,
    ElasticPolicy,
    ElasticPool,
    HostBuffer,
    PoolExhausted,
    StaticPolicy,
    VirtualTensor,
    create_policy,
)

PAGE = os.sysconf("SC_PAGE_SIZE")
CHUNK = 4 * PAGE


class Balloon:
    """A fake client: gives back its unmapped chunks when the pool asks, newest first."""

    def __init__(self, pool: ElasticPool, name: str, log: list[str] | None = None,
                 with_reclaimable: bool = True) -> None:
        self.pool, self.name, self.log = pool, name, log if log is not None else []
        self.chunks: list = []
        pool.register(name, self.reclaim, self.reclaimable if with_reclaimable else None)

    def take(self, num: int) -> None:
        self.chunks += self.pool.inflate(self.name, num)

    def give(self, num: int) -> None:
        given, self.chunks = self.chunks[len(self.chunks) - num:], self.chunks[:len(self.chunks) - num]
        self.pool.deflate(self.name, given)

    def reclaimable(self) -> int:
        return sum(1 for chunk in self.chunks if chunk.num_mappings == 0)

    def reclaim(self, num: int) -> int:
        self.log.append(f"{self.name}:{num}")
        free = [chunk for chunk in self.chunks if chunk.num_mappings == 0][-num:]
        self.chunks = [chunk for chunk in self.chunks if chunk not in free]
        self.pool.deflate(self.name, free)
        return len(free)


def _pool(backend, num_chunks=10, **kwargs) -> ElasticPool:
    return ElasticPool(backend, num_chunks * CHUNK + CHUNK - 1, CHUNK, **kwargs)


def _accounted(pool: ElasticPool) -> None:
    held = sum(pool.num_held(client) for client in pool.clients)
    assert held + pool.num_free() == pool.num_chunks
    assert pool.num_alive <= pool.num_chunks
    assert pool.backend.num_live_chunks == pool.num_alive


def test_budget_chunks_are_created_lazily_and_reused(host):
    pool = _pool(host)
    assert pool.num_chunks == 10 and pool.num_alive == 0 and host.num_live_chunks == 0
    kv = Balloon(pool, "kv")
    kv.take(3)
    assert pool.num_alive == 3 and host.physical_bytes() == 3 * CHUNK
    assert all(chunk.owner == "kv" for chunk in kv.chunks)
    first_ids = [chunk.chunk_id for chunk in kv.chunks]
    kv.give(3)
    assert pool.num_free() == 10 and pool.num_alive == 3
    kv.take(4)  # three reused from the free list (lowest physical offset first), one created
    assert [chunk.chunk_id for chunk in kv.chunks] == first_ids + [3]
    assert host.num_live_chunks == 4
    _accounted(pool)


def test_inflate_is_all_or_nothing_and_reports_what_was_available(host):
    log: list[str] = []
    pool = _pool(host)
    kv, act = Balloon(pool, "kv", log), Balloon(pool, "activations", log)
    kv.take(4)
    act.take(3)
    for chunk in kv.chunks:  # mapped chunks cannot be reclaimed
        host.map(host.reserve(CHUNK), chunk)
    with pytest.raises(PoolExhausted) as info:
        act.take(4)
    assert (info.value.client, info.value.requested, info.value.available) == ("activations", 4, 3)
    assert pool.num_held("activations") == 3 and pool.num_free() == 3
    assert pool.telemetry().num_exhausted == 1
    assert log == []  # kv's reclaimable() is 0, so it was not even asked
    _accounted(pool)


def test_elastic_reclaims_in_priority_order_never_from_the_requester(host):
    log: list[str] = []
    pool = _pool(host)
    act, weights, kv = (Balloon(pool, name, log) for name in ("activations", "weights", "kv"))
    kv.take(4)
    act.take(3)
    weights.take(2)
    assert pool.can_inflate("activations", 7) and not pool.can_inflate("activations", 8)
    assert pool.num_obtainable("activations") == 7 and pool.num_obtainable("kv") == 6
    assert log == []  # can_inflate has no side effects
    act.take(6)  # 1 free, then kv gives 4, then weights gives 1
    assert log == ["kv:5", "weights:1"]
    assert (pool.num_held("kv"), pool.num_held("weights"), pool.num_held("activations")) == (0, 1, 9)
    telemetry = pool.telemetry()
    assert (telemetry.num_reclaims, telemetry.num_chunks_reclaimed) == (2, 5)
    log.clear()
    kv.take(1)  # only activations and weights can give; activations comes first in the default order
    assert log == ["activations:1"]
    _accounted(pool)


def test_elastic_custom_reclaim_order(host):
    log: list[str] = []
    pool = _pool(host, reclaim_order=("activations", "kv"))
    assert pool.policy == ElasticPolicy(("activations", "kv"))
    kv, act, other = Balloon(pool, "kv", log), Balloon(pool, "activations", log), Balloon(pool, "other", log)
    kv.take(5)
    act.take(5)
    other.take(0)
    with pytest.raises(PoolExhausted):
        other.take(11)
    assert log == []  # more than the whole budget: refused before asking anybody
    other.take(7)
    assert log == ["activations:7", "kv:2"]


def test_clients_without_reclaimable_are_asked_but_not_promised(host):
    log: list[str] = []
    pool = _pool(host)
    kv = Balloon(pool, "kv", log, with_reclaimable=False)
    Balloon(pool, "activations", log)
    kv.take(10)
    assert not pool.can_inflate("activations", 1)
    pool.inflate("activations", 2)
    assert log == ["kv:2"] and pool.num_held("kv") == 8


def test_static_policy_never_exceeds_a_share_and_never_reclaims(host):
    log: list[str] = []
    pool = _pool(host, policy="static", static_split_bytes={"kv": 6 * CHUNK + 5, "activations": 3 * CHUNK})
    assert pool.policy == StaticPolicy({"kv": 6, "activations": 3}, 10)
    kv, act, weights = (Balloon(pool, name, log) for name in ("kv", "activations", "weights"))
    kv.take(6)
    with pytest.raises(PoolExhausted) as info:
        kv.take(1)
    assert info.value.available == 0
    assert not pool.can_inflate("activations", 4) and pool.can_inflate("activations", 3)
    assert [pool.num_obtainable(name) for name in ("kv", "activations", "weights")] == [0, 3, 0]
    with pytest.raises(PoolExhausted) as info:
        act.take(4)
    assert info.value.available == 3
    act.take(3)
    with pytest.raises(PoolExhausted):
        weights.take(1)  # no share
    assert log == [] and pool.num_free() == 1
    kv.give(2)
    kv.take(2)
    _accounted(pool)


def test_policy_configuration_errors():
    with pytest.raises(ValueError, match="exceed"):
        create_policy("static", num_chunks=4, chunk_bytes=1, static_split={"kv": 3, "activations": 2})
    with pytest.raises(ValueError, match="exactly one"):
        create_policy("static", num_chunks=4, chunk_bytes=1)
    with pytest.raises(TypeError):
        create_policy("elastic", num_chunks=4, chunk_bytes=1, static_split={"kv": 1})
    with pytest.raises(KeyError, match="unknown pool policy"):
        create_policy("greedy", num_chunks=4, chunk_bytes=1)
    with pytest.raises(ValueError, match="duplicates"):
        ElasticPolicy(("kv", "kv"))


def test_deflate_and_register_misuse(host):
    pool = _pool(host)
    kv, act = Balloon(pool, "kv"), Balloon(pool, "activations")
    kv.take(2)
    act.take(1)
    with pytest.raises(ValueError, match="already registered"):
        pool.register("kv")
    with pytest.raises(KeyError, match="register it first"):
        pool.inflate("weights", 1)
    with pytest.raises(ValueError, match="not held by 'activations'"):
        pool.deflate("activations", kv.chunks[:1])
    with pytest.raises(ValueError, match="not held"):
        pool.deflate("kv", [kv.chunks[0], kv.chunks[0]])
    vt = VirtualTensor(host, (2 * CHUNK,), torch.uint8, CHUNK)
    vt.map_page(1, kv.chunks[1])
    with pytest.raises(ValueError, match="still mapped"):
        pool.deflate("kv", kv.chunks)
    assert pool.num_held("kv") == 2  # nothing was deflated
    pool.deflate("kv", [vt.unmap_page(1)])
    with pytest.raises(ValueError, match="not held"):
        pool.deflate("kv", kv.chunks[1:])  # double free
    with pytest.raises(ValueError):
        pool.inflate("kv", -1)
    _accounted(pool)


def test_reclaim_callbacks_must_be_honest_and_not_reenter(host):
    pool = _pool(host, num_chunks=4)
    pool.register("kv", reclaim=lambda num: num)  # claims to give chunks but deflates none
    pool.inflate("kv", 4)
    pool.register("activations")
    with pytest.raises(RuntimeError, match="reported 1 chunks but deflated 0"):
        pool.inflate("activations", 1)
    pool2 = _pool(host, num_chunks=1)
    pool2.register("kv", reclaim=lambda num: len(pool2.inflate("kv", 0)))
    pool2.register("activations")
    pool2.inflate("kv", 1)
    with pytest.raises(RuntimeError, match="inside a reclaim callback"):
        pool2.inflate("activations", 1)


def test_trim_and_close_return_memory(host, rss_bytes):
    pool = ElasticPool(host, 64 * (256 << 10), 256 << 10)  # 16 MiB of 256 KiB chunks
    kv = Balloon(pool, "kv")
    kv.take(64)
    vt = VirtualTensor(host, (64 * (256 << 10),), torch.uint8, 256 << 10)
    vt.map_pages(0, kv.chunks)
    before = rss_bytes()
    vt.tensor.fill_(1)
    assert rss_bytes() - before >= 0.9 * (16 << 20)
    assert host.physical_bytes() == 16 << 20
    pool.deflate("kv", vt.unmap_pages(0, 64))
    kv.chunks = []
    assert host.physical_bytes() == 16 << 20  # deflated chunks stay alive for reuse
    assert pool.trim(keep_free=16) == 48
    assert host.physical_bytes() == 4 << 20 and pool.num_alive == 16
    assert rss_bytes() - before < 0.1 * (16 << 20)
    kv.take(20)  # 16 reused, 4 new
    assert host.num_live_chunks == 20 and host.physical_bytes() == 5 << 20
    pool.close()
    assert host.physical_bytes() == 0 and host.num_live_chunks == 0
    with pytest.raises(BackendClosed):
        pool.inflate("kv", 1)
    pool.close()


def test_telemetry_is_a_json_serialisable_snapshot(host):
    buffer = HostBuffer(8 * CHUNK, CHUNK)
    pool = _pool(host, host_buffer=buffer)
    kv, act = Balloon(pool, "kv"), Balloon(pool, "activations")
    kv.take(4)
    act.take(2)
    kv.give(1)
    buffer.allocate(3)
    pool.record_swap(bytes_out=3 * CHUNK)
    pool.record_swap(bytes_in=CHUNK)
    snapshot = pool.telemetry()
    assert json.loads(json.dumps(snapshot.to_dict())) == {
        "backend": "host", "policy": "elastic", "budget_bytes": 11 * CHUNK - 1, "chunk_bytes": CHUNK,
        "num_chunks": 10, "chunks_per_client": {"kv": 3, "activations": 2}, "num_free_chunks": 5,
        "num_alive_chunks": 6, "host_buffer_used_bytes": 3 * CHUNK, "host_buffer_capacity_bytes": 8 * CHUNK,
        "num_inflates": 2, "num_deflates": 1, "num_reclaims": 0, "num_chunks_reclaimed": 0,
        "num_exhausted": 0, "bytes_swapped_out": 3 * CHUNK, "bytes_swapped_in": CHUNK}
    with pytest.raises(AttributeError):
        snapshot.num_free_chunks = 0
    kv.take(1)
    assert snapshot.chunks_per_client == {"kv": 3, "activations": 2}  # a snapshot, not a live view


def test_pool_rejects_bad_sizes(host):
    with pytest.raises(ValueError, match="multiple"):
        ElasticPool(host, 10 * CHUNK, CHUNK + 1)
    with pytest.raises(ValueError, match="smaller than one chunk"):
        ElasticPool(host, CHUNK - 1, CHUNK)


def test_telemetry_can_be_read_from_another_thread_while_the_pool_changes(sim):
    pool = ElasticPool(sim, 64 * (2 << 20), 2 << 20)
    kv = Balloon(pool, "kv")
    act = Balloon(pool, "activations")
    snapshots, errors, done = [], [], threading.Event()

    def reader() -> None:
        try:
            while not done.is_set():
                snapshots.append(pool.telemetry())
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(300):
        kv.take(40)
        act.take(24)
        kv.give(40)
        act.give(24)
    done.set()
    thread.join()
    assert errors == [] and snapshots
    assert all(sum(s.chunks_per_client.values()) + s.num_free_chunks == 64 for s in snapshots)
