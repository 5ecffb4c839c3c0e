"""Migration policies and the controller's planner, pure Python: exact plans for given loads."""

from __future__ import annotations

from dataclasses import replace

import pytest

from deployments.cluster.state import ClusterState
from deployments.migration.planner import MigrationPlanner
from deployments.migration.policy import (
    BalanceAndPackPolicy,
    BalancePolicy,
    MigrationOrder,
    NoMigration,
    ReplicaLoad,
    RequestLoad,
    create_migration_policy,
)
from deployments.telemetry import ReplicaReport, ReplicaStats


def request(request_id, kv_chunks, remaining=100, migratable=True):
    return RequestLoad(request_id, num_tokens=kv_chunks * 2, num_remaining=remaining, kv_chunks=kv_chunks,
                       is_migratable=migratable)


def replica(replica_id, *requests, capacity=100, waiting=0, extra_used=0):
    used = sum(r.kv_chunks for r in requests) + extra_used
    return ReplicaLoad(replica_id, capacity, used, waiting, tuple(requests))


def slots(*replica_ids, count=2):
    return dict.fromkeys(replica_ids, count)


def plan(policy, replicas, now=0.0, free=2):
    return [(o.request_id, o.source, o.target, o.reason)
            for o in policy.plan(replicas, slots(*(r.replica_id for r in replicas), count=free), now)]


# ---- balance -------------------------------------------------------------------------------------------------
HOT = replica("hot", request("a", 10, remaining=3), request("b", 30, remaining=5), request("c", 50, remaining=90))
COLD = replica("cold", request("z", 10))


def test_balance_best_fit_moves_the_request_closest_to_equalising():
    # hot 0.9, cold 0.1: 40 chunks would equalise; b (30) and c (50) are 10 away, b wins the tie by id
    assert plan(BalancePolicy(), [HOT, COLD]) == [("b", "hot", "cold", "balance")]


def test_balance_shortest_remaining_first():
    # a has 3 tokens left: moving it leaves hot at exactly 0.8, no longer above the watermark
    assert plan(BalancePolicy(selection="shortest_remaining"), [HOT, COLD]) == [("a", "hot", "cold", "balance")]
    # with a lower high watermark hot is still too full after a: b (5 left) goes next, in the same round
    assert plan(BalancePolicy(selection="shortest_remaining", high_watermark=0.7), [HOT, COLD]) == [
        ("a", "hot", "cold", "balance"), ("b", "hot", "cold", "balance")]


def test_waiting_requests_count_towards_the_load():
    busy = replica("busy", request("r", 20), request("s", 40), waiting=30)  # 0.6 used, 0.9 with waiting
    # 45 chunks would equalise: s (40) fits best
    assert plan(BalancePolicy(), [busy, replica("idle")]) == [("s", "busy", "idle", "balance")]
    assert plan(BalancePolicy(), [replace_waiting(busy, 0), replica("idle")]) == []


def replace_waiting(load, waiting):
    return ReplicaLoad(load.replica_id, load.capacity_chunks, load.used_chunks, waiting, load.requests)


def test_balance_needs_a_replica_below_the_low_watermark():
    assert plan(BalancePolicy(), [HOT, replica("warm", request("w", 55))]) == []


def test_balance_only_moves_when_the_gap_shrinks_and_the_target_stays_below_high():
    # one 85-chunk request: moving it would make 0.0 / 0.95, the target above the high watermark
    assert plan(BalancePolicy(), [replica("hot", request("big", 85)), replica("cold", request("z", 10))]) == []
    # not migratable (still prefilling, or pinned): nothing to move
    assert plan(BalancePolicy(), [replica("hot", request("p", 90, migratable=False)), COLD]) == []


def test_balance_respects_slots_and_the_round_limit():
    assert plan(BalancePolicy(), [HOT, COLD], free=0) == []
    hot2 = replica("hot2", request("d", 45), request("e", 45))
    cold2 = replica("cold2")
    orders = plan(BalancePolicy(max_per_round=3), [HOT, hot2, COLD, cold2], free=1)
    # equal loads: the higher id goes first, to the emptiest target; one slot each, so one order per pair
    assert orders == [("d", "hot2", "cold2", "balance"), ("b", "hot", "cold", "balance")]


def test_balance_with_different_capacities():
    big = ReplicaLoad("big", 400, 80, 0, (request("q", 80),))  # 0.2 of a larger pool
    small = replica("small", request("m", 45), request("n", 45))  # 0.9
    assert plan(BalancePolicy(), [small, big]) == [("m", "small", "big", "balance")]


# ---- packing ------------------------------------------------------------------------------------------------
def three_light():
    return [replica("a", request("a1", 10)), replica("b", request("b1", 20)),
            replica("c", request("c1", 15), request("c2", 15))]


def test_pack_drains_the_least_loaded_replica_into_the_fullest_that_fits():
    policy = BalanceAndPackPolicy(pack_watermark=0.6)
    assert plan(policy, three_light()) == [("a1", "a", "c", "pack")]
    assert policy.scale_down_candidates() == ["a"]


def test_pack_largest_first_and_budget_per_interval():
    policy = BalanceAndPackPolicy(pack_watermark=0.6, pack_budget=2, pack_interval_s=10.0)
    drain = replica("d", request("d1", 5), request("d2", 15), request("d3", 10))  # 0.3, the least loaded
    others = [replica("x", request("x1", 40)), replica("y", request("y1", 35))]
    # 105 chunks fit in x and y at 0.6: drain d, largest first into the fullest that stays <= 0.6:
    # d2 -> x (0.55); d3 would take x to 0.65, so y (0.45); then the budget of 2 is spent
    assert plan(policy, [drain, *others], now=0.0) == [("d2", "d", "x", "pack"), ("d3", "d", "y", "pack")]
    assert plan(policy, [replica("d", request("d1", 5)), *others], now=5.0) == []  # budget used up
    assert plan(policy, [replica("d", request("d1", 5)), *others], now=10.0) == [("d1", "d", "x", "pack")]


def test_no_packing_when_the_load_does_not_fit_on_fewer_replicas():
    policy = BalanceAndPackPolicy(pack_watermark=0.6)
    assert plan(policy, [replica("a", request("a1", 50)), replica("b", request("b1", 50))]) == []
    assert policy.scale_down_candidates() == []


def test_balance_comes_before_packing():
    policy = BalanceAndPackPolicy()
    assert plan(policy, [HOT, COLD]) == [("b", "hot", "cold", "balance")]


def test_the_drained_replica_stays_the_candidate_while_it_qualifies():
    policy = BalanceAndPackPolicy(pack_watermark=0.6, pack_budget=0)
    assert plan(policy, three_light()) == [] and policy.scale_down_candidates() == ["a"]
    # a got a new request and is no longer the least loaded; it is still the one being drained
    shifted = [replica("a", request("a1", 10), request("a2", 15)), replica("b", request("b1", 20)),
               replica("c", request("c1", 15), request("c2", 15))]
    plan(policy, shifted)
    assert policy.scale_down_candidates() == ["a"]


def test_pack_can_drain_the_newest_replica_the_one_serve_stops_first():
    policy = BalanceAndPackPolicy(pack_watermark=0.6, drain="newest")
    a, b, c = three_light()
    replicas = [replace(a, started_at=100.0), replace(b, started_at=300.0), replace(c, started_at=200.0)]
    # b (20 chunks) is not the least loaded, but the newest: it is drained, into c, the fullest that fits
    assert plan(policy, replicas) == [("b1", "b", "c", "pack")]
    assert policy.scale_down_candidates() == ["b"]
    with pytest.raises(ValueError, match="drain"):
        BalanceAndPackPolicy(drain="oldest")


def test_registry_and_option_checks():
    assert isinstance(create_migration_policy("none"), NoMigration)
    assert create_migration_policy("balance+pack", {"pack_budget": 1}).pack_budget == 1
    with pytest.raises(ValueError, match="low_watermark"):
        BalancePolicy(low_watermark=0.9, high_watermark=0.5)
    with pytest.raises(ValueError, match="selection"):
        BalancePolicy(selection="random")
    with pytest.raises(ValueError, match="two different replicas"):
        MigrationOrder("r", "a", "a")


# ---- the planner ----------------------------------------------------------------------------------------------
class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def planner(policy=None, **kwargs):
    clock = Clock()
    return MigrationPlanner(policy or BalancePolicy(), clock=clock, plan_interval_s=1.0, cooldown_s=10.0,
                            **kwargs), clock


def test_orders_are_delivered_once_and_retired_when_the_source_stops_listing_them():
    p, clock = planner()
    loads = {"hot": HOT, "cold": COLD}
    assert [o.request_id for o in p.plan(loads)] == ["b"]
    assert p.take_orders("cold") == ()
    assert p.take_orders("hot") == (MigrationOrder("b", "hot", "cold", "auto", "balance"),)
    assert p.take_orders("hot") == ()
    assert p.view()["in_flight"][0]["state"] == "delivered"
    p.observe("hot", migrating=["b"])  # running
    assert len(p.view()["in_flight"]) == 1
    clock.now += 1.0
    # while b is in flight the plan treats it as moved: hot is at 0.6, nothing more to do
    assert p.plan(loads) == []
    p.observe("hot", migrating=[])  # ended
    assert p.view()["in_flight"] == []
    # b is cooling down: even if it is reported on hot again, it is not planned
    clock.now += 1.0
    assert [o.request_id for o in p.plan(loads)] == ["c"]
    clock.now += 10.0
    p.observe("hot", migrating=[])
    assert p.take_orders("hot")[0].request_id == "c"


def test_planning_is_rate_limited_and_in_flight_orders_take_slots():
    p, clock = planner(max_concurrent=1)
    loads = {"hot": HOT, "cold": COLD}
    assert len(p.plan(loads)) == 1
    clock.now += 0.5
    assert p.plan(loads) == []  # too soon
    clock.now += 1.0
    assert p.plan(loads, force=True) == []  # hot and cold each have their one slot taken


def test_orders_expire_and_vanished_replicas_drop_theirs():
    p, clock = planner(order_timeout_s=5.0)
    p.plan({"hot": HOT, "cold": COLD})
    clock.now += 6.0
    p.plan({"hot": HOT, "cold": COLD})  # the old order timed out; the request is cooling? no: timed out, replanned
    assert [entry["request_id"] for entry in p.view()["in_flight"]] == ["b"]
    p.forget_replica("cold")
    assert p.view()["in_flight"] == []


def test_forced_orders_by_response_id_wait_for_the_request_to_be_reported():
    p, clock = planner(NoMigration())
    p.plan({"hot": HOT, "cold": COLD})
    assert p.force("cmpl-7", mode="recompute", replicas={"hot": HOT, "cold": COLD})["status"] == "pending"
    with_request = replica("hot", request("cmpl-7-0", 10), request("cmpl-7-1", 10))
    clock.now += 0.5  # within plan_interval_s: no policy planning, but forced orders resolve and are delivered
    orders = p.plan({"hot": with_request, "cold": COLD})
    assert [(o.request_id, o.source, o.target, o.mode, o.reason) for o in orders] == [
        ("cmpl-7-0", "hot", "cold", "recompute", "forced"), ("cmpl-7-1", "hot", "cold", "recompute", "forced")]
    assert [order.request_id for order in p.take_orders("hot")] == ["cmpl-7-0", "cmpl-7-1"]
    result = p.force("z", target="hot", replicas={"hot": with_request, "cold": COLD})
    assert result["status"] == "queued" and result["orders"][0]["target"] == "hot"
    with pytest.raises(ValueError, match="no replica"):
        p.force("z", target="elsewhere", replicas={"hot": with_request})
    clock.now += 20.0
    assert p.force("never-seen", replicas={})["status"] == "pending"
    clock.now += 20.0
    p.plan({})
    assert p.view()["pending_forced"] == []


def test_cluster_state_builds_loads_and_shows_migration_totals():
    state = ClusterState(clock=lambda: 10.0)
    load = ReplicaLoad("a", 100, 40, 10, (RequestLoad("r", 80, 20, 40, True),))
    counters = {"started": 3, "committed": 2, "aborted": 1, "downtime_sum_s": 0.5, "downtime_count": 2}
    state.report("a", ReplicaReport(ReplicaStats(kv_chunks_used=40, kv_chunks_free=60), load=load,
                                    migrating=("r",), migration=counters))
    state.report("b", ReplicaReport(ReplicaStats(kv_chunks_used=0, kv_chunks_free=100)))  # no migration
    assert state.loads() == {"a": load}
    view = state.view(BalancePolicy())
    assert view["replicas"]["a"]["kv_load"] == 0.5 and view["replicas"]["a"]["migrating"] == ["r"]
    assert view["migration_totals"]["committed"] == 2 and view["migration_totals"]["mean_downtime_s"] == 0.25
    assert view["migration_policy"] == "balance" and view["migrations"] == []
