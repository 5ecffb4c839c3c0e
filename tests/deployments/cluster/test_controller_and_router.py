"""Cluster state (what the controller keeps) and the router's ranking, without Ray."""

from __future__ import annotations

import asyncio
import os
import threading
from types import SimpleNamespace

import pytest

from deployments.cluster.priority import PROXY_TITLE, lift_processes, take_priority
from deployments.cluster.ranking import is_fresh, rank_by_headroom
from deployments.cluster.state import ClusterState
from deployments.migration.policy import NoMigration, create_migration_policy
from deployments.telemetry import ReplicaReport, ReplicaStats, RoutingStats


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def stats(running=0, waiting=0, used=0, free=100):
    return ReplicaStats(num_running=running, num_waiting=waiting, num_swapped=0, kv_chunks_used=used,
                        kv_chunks_free=free)


def test_cluster_view_totals_fresh_replicas_and_expires_silent_ones():
    clock = Clock()
    state = ClusterState(stale_after_s=2.0, expire_after_s=10.0, clock=clock)
    pools = ({"chunks_per_client": {"kv": 10}, "num_free_chunks": 90},)
    state.report("a", ReplicaReport(stats(running=2, used=10, free=90), pools))
    state.report("b", ReplicaReport(stats(running=1, waiting=3, used=30, free=70), pools))
    view = state.view(NoMigration())
    assert view["num_replicas"] == 2 and view["migration_policy"] == "none" and view["migrations"] == []
    assert view["totals"] == {"num_running": 3, "num_waiting": 3, "num_swapped": 0, "kv_chunks_used": 40,
                              "kv_chunks_free": 160, "kv_usage": 0.2}
    assert view["replicas"]["a"]["pools"] == list(pools) and view["replicas"]["a"]["is_stale"] is False
    clock.now += 3
    state.report("a", ReplicaReport(stats(running=5, used=10, free=90), pools))
    view = state.view(NoMigration())
    assert view["replicas"]["b"]["is_stale"] is True and view["replicas"]["b"]["age_s"] == 3.0
    assert view["totals"]["num_running"] == 5  # the stale replica is left out
    clock.now += 8
    assert state.expire() == ["b"]
    assert list(state.view(NoMigration())["replicas"]) == ["a"]
    state.remove("a")
    assert state.num_replicas == 0


def test_migration_policies_are_a_registry():
    assert create_migration_policy("none").plan([], {}, 0.0) == []
    assert create_migration_policy("balance", {"high_watermark": 0.9}).high_watermark == 0.9
    with pytest.raises(ValueError, match="known: \\['balance', 'balance\\+pack', 'none'\\]"):
        create_migration_policy("teleport")
    with pytest.raises(ValueError, match="bad options"):
        create_migration_policy("none", {"high_watermark": 0.9})


def replica(name, **routing_stats):
    return SimpleNamespace(name=name, routing_stats=routing_stats)


def fresh(name, free, waiting=0, now=100.0, age=0.1):
    return replica(name, kv_free_chunks=free, kv_usage=0.0, num_running=0, num_waiting=waiting,
                   timestamp=now - age)


def names(groups):
    """Group members sorted: the order inside a group is random (Serve picks by queue length there)."""
    return [sorted(replica.name for replica in group) for group in groups]


def test_freshness_and_the_typed_stats_serve_carries_as_a_dict():
    assert is_fresh(RoutingStats(kv_free_chunks=1, num_waiting=0, timestamp=99.0), 100.0, 2.0)
    assert not is_fresh(RoutingStats(kv_free_chunks=1, num_waiting=0, timestamp=97.0), 100.0, 2.0)
    assert not is_fresh(None, 100.0, 2.0)
    assert RoutingStats.from_dict({}) is None
    assert RoutingStats.from_dict({"kv_free_chunks": 1, "timestamp": 100.0}) is None  # no num_waiting
    full = RoutingStats(kv_free_chunks=5, num_waiting=1, timestamp=3.0, kv_usage=0.5, num_running=2, is_draining=True)
    assert RoutingStats.from_dict(full.to_dict()) == full


def test_a_replica_whose_engine_stopped_ranks_after_every_other_even_a_draining_one():
    """A stopped engine's last stats look idle (all its KV free): ranked by them, it drew every new request
    and failed it until Serve replaced the replica."""
    stopped = replica("stopped", kv_free_chunks=1000, kv_usage=0.0, num_running=0, num_waiting=0, timestamp=99.9,
                      is_stopped=True)
    draining = replica("draining", kv_free_chunks=900, kv_usage=0.0, num_running=0, num_waiting=0, timestamp=99.9,
                       is_draining=True)
    assert names(rank_by_headroom([stopped, draining, fresh("busy", 10, waiting=3)], now=100.0)) == \
        [["busy"], ["draining"], ["stopped"]]
    assert names(rank_by_headroom([stopped], now=100.0)) == [["stopped"]]  # the only one: still a candidate
    assert RoutingStats.from_dict(stopped.routing_stats).is_stopped
    assert not RoutingStats.from_dict({"kv_free_chunks": 1, "num_waiting": 0, "timestamp": 1.0}).is_stopped


def test_more_headroom_ranks_first():
    groups = rank_by_headroom([fresh("loaded", 10), fresh("idle", 1000)], now=100.0)
    assert names(groups) == [["idle"], ["loaded"]]


def test_similar_headroom_shares_the_top_group():
    groups = rank_by_headroom([fresh("a", 1000), fresh("b", 950), fresh("c", 500)], now=100.0,
                              headroom_tolerance=0.1)
    assert names(groups) == [["a", "b"], ["c"]]


def test_a_burst_spreads_once_the_requests_sent_since_the_stats_eat_the_lead():
    """Stats are up to 0.5 s old: the requests this router sent a replica since then lower its headroom, each
    counted as its mean KV per running request (usage 0.25 of 400 = 100 chunks over 1 request; an idle
    replica has no mean and is not lowered)."""
    a = replica("a", kv_free_chunks=300, kv_usage=0.25, num_running=1, num_waiting=0, timestamp=99.9)
    b = replica("b", kv_free_chunks=200, kv_usage=0.5, num_running=2, num_waiting=0, timestamp=99.9)
    sent = {"a": 0, "b": 0}
    ranked = lambda: names(rank_by_headroom([a, b], now=100.0, routed_since=lambda r: sent[r.name]))  # noqa: E731
    assert ranked() == [["a"], ["b"]]
    sent["a"] = 1  # 300 - 100 = 200: level with b
    assert ranked() == [["a", "b"]]
    sent["a"] = 2  # 100: b leads now
    assert ranked() == [["b"], ["a"]]
    idle = replica("idle", kv_free_chunks=400, kv_usage=0.0, num_running=0, num_waiting=0, timestamp=99.9)
    sent["idle"] = 2  # b's requests (100 chunks each) say nothing of what was sent to the idle one
    assert names(rank_by_headroom([idle, b], now=100.0, routed_since=lambda r: sent[r.name])) == [["idle"], ["b"]]


def test_a_waiting_queue_ranks_after_replicas_without_one():
    groups = rank_by_headroom([fresh("queued", 5000, waiting=3), fresh("small", 100),
                               fresh("queued_less", 5000, waiting=1)], now=100.0)
    assert names(groups) == [["small"], ["queued_less"], ["queued"]]


def test_stale_replicas_come_last_and_all_stale_is_power_of_two():
    stale = fresh("stale", 9999, age=6.0)
    empty = replica("starting")
    groups = rank_by_headroom([stale, fresh("ok", 10), empty], now=100.0)
    assert names(groups) == [["ok"], ["stale", "starting"]]
    # stats a few seconds old (Serve's controller delivering late on a busy box) still rank the replica by them
    late = fresh("late", 9999, age=3.0)
    assert names(rank_by_headroom([late, fresh("ok", 10)], now=100.0)) == [["late"], ["ok"]]
    only_stale = [fresh(f"s{i}", 10, age=9.0) for i in range(5)]
    [group] = rank_by_headroom(only_stale, now=100.0)
    assert len(group) == 2 and len({r.name for r in group}) == 2
    assert rank_by_headroom([], now=100.0) == []


def test_the_router_counts_what_it_sent_a_replica_since_its_stats():
    import time

    from deployments.cluster.router import KVHeadroomRouter

    router = object.__new__(KVHeadroomRouter)  # its bookkeeping alone, without Serve's machinery
    stats = {"kv_usage": 0.25, "num_running": 1, "num_waiting": 0}
    a = SimpleNamespace(name="a", replica_id=SimpleNamespace(unique_id="a"),
                        routing_stats={**stats, "kv_free_chunks": 300, "timestamp": time.time()})
    b = SimpleNamespace(name="b", replica_id=SimpleNamespace(unique_id="b"),
                        routing_stats={**stats, "kv_free_chunks": 150, "timestamp": time.time()})

    def request(number: int):
        return SimpleNamespace(kwargs={}, metadata=SimpleNamespace(internal_request_id=f"r{number}"))

    async def burst() -> list:
        # a burst's requests are all chosen before the first is sent; a retried choice counts once
        return [names(await router.choose_replicas([a, b], request(number))) for number in (0, 1, 2, 0)]

    # a: 300 chunks free, 100 per running request; b: 150 and 50. Each request chosen for a lone best replica
    # counts there: a 300 -> 200 -> 100, then b leads, then both level (a group of two: Serve's queue lengths)
    assert asyncio.run(burst()) == [[["a"], ["b"]], [["a"], ["b"]], [["b"], ["a"]], [["a", "b"]]]
    assert (router._routed_since(a), router._routed_since(b)) == (2, 1)
    a.routing_stats = {**a.routing_stats, "timestamp": time.time() + 1.0}  # newer stats already count those
    assert router._routed_since(a) == 0 and router._sent["a"] == {}


def test_the_controller_takes_a_priority_for_every_thread_it_may(tmp_path):
    """Every thread of the process is set (here to the nice value it has: allowed without CAP_SYS_NICE); a
    thread that ended or a missing task list changes nothing and raises nothing."""
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert take_priority(nice) == len(os.listdir("/proc/self/task")) >= threading.active_count()
    (tmp_path / "999999999").mkdir()
    assert take_priority(nice, str(tmp_path)) == 0
    assert take_priority(nice, str(tmp_path / "missing")) == 0


def test_a_nodes_processes_are_lifted_by_their_title_only_upwards(tmp_path):
    """`lift_processes` reads /proc-like entries: only processes titled exactly so (or `title.method`, as Ray
    titles a worker running a method) whose nice is above the target; here the target is this process's own
    nice, so nothing is above it and nothing changes."""
    pid = os.getpid()
    me = tmp_path / str(pid)
    (me / "task" / str(pid)).mkdir(parents=True)
    (me / "cmdline").write_bytes(PROXY_TITLE.encode() + b".ready\0\0")
    (tmp_path / "self").mkdir()
    nice = os.getpriority(os.PRIO_PROCESS, 0)
    assert lift_processes(PROXY_TITLE, nice, str(tmp_path)) == 0  # not above the target: left alone
    assert lift_processes(PROXY_TITLE, nice - 1, str(tmp_path)) in (0, 1)  # 1 only with CAP_SYS_NICE
    os.setpriority(os.PRIO_PROCESS, pid, nice)  # as it was
    (me / "cmdline").write_bytes(b"ray::ProxyActorX\0")
    assert lift_processes(PROXY_TITLE, nice - 1, str(tmp_path)) == 0  # another title
