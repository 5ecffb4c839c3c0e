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
from engine.host_split import HostRoom, HostSplit


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


# ---- layerwise destinations: a request placed with its top layers on the destination's host ------------------
def layered(request_id, pages, num_layers=4, remaining=100):
    """A request of `pages` pages per layer, with the splits a layerwise engine reports for it
    (engine/core/offload_policy.py, `import_splits`): the other layers' device chunks, the host layers' pages,
    and the staging its next decode takes when copied in (2 x the pages of two consecutive layers)."""
    splits = tuple(HostSplit(h, 2 * (num_layers - h) * pages, 2 * h * pages, 2 * pages * min(h, 2))
                   for h in range(1, num_layers + 1))
    return replace(request(request_id, 2 * num_layers * pages, remaining), host_splits=splits)


def with_host(load, pages, staged=True):
    return replace(load, host=HostRoom(pages, staged))


def test_a_layerwise_destination_takes_a_request_its_device_cannot_hold_whole():
    big = layered("big", 10)  # 80 chunks; with 1, 2, 3, 4 top layers on a host: 60, 40, 20, 0 device chunks
    hot, cold = replica("hot", big, extra_used=10), replica("cold", request("z", 10))  # 0.9 and 0.1
    # whole, big would leave cold at 0.9 > the high watermark: no move without host room
    assert plan(BalancePolicy(), [hot, cold]) == []
    # in place (nothing staged): 1 top layer on cold's host, 60 device chunks: cold at 0.7
    in_place = with_host(cold, 100, staged=False)
    assert plan(BalancePolicy(), [hot, in_place]) == [("big", "hot", "cold", "balance")]
    placed = in_place.place(big, 0.8)
    assert (placed.num_host_layers, placed.load.used_chunks, placed.load.host.pages) == (1, 70, 80)
    # copies: 1 or 2 host layers need 60 + 20 or 40 + 40 chunks with the staging (> the 70 left); 3 need 20 + 40
    copying = with_host(cold, 100)
    assert plan(BalancePolicy(), [hot, copying]) == [("big", "hot", "cold", "balance")]
    placed = copying.place(big, 0.8)
    assert (placed.num_host_layers, placed.load.used_chunks, placed.load.host.pages) == (3, 30, 40)
    # a host that cannot hold those 3 layers (60 pages): refused, like the destination's reserve would
    assert plan(BalancePolicy(), [hot, with_host(cold, 59)]) == []
    assert copying.place(request("whole", 80), 0.8) is None  # a `none` source reports no splits


def test_host_room_is_used_up_by_the_requests_placed_on_it():
    room = with_host(replica("cold"), 50, staged=False)
    first = room.place(layered("r1", 10), 0.3)  # 30 device chunks left: 3 top layers on the host, 60 pages > 50
    assert first is None
    first = room.place(layered("r1", 10), 0.6)  # 1 top layer: 60 device chunks, 20 host pages
    assert (first.num_host_layers, first.load.used_chunks, first.load.host.pages) == (1, 60, 30)
    second = first.load.place(layered("r2", 5), 0.9)  # 30 chunks left: 1 top layer (30 device, 10 host pages)
    assert (second.num_host_layers, second.load.used_chunks, second.load.host.pages) == (1, 90, 20)
    # 10 chunks left: 3 host layers would leave 10 device chunks, but need 30 host pages (20 left)
    assert second.load.place(layered("r3", 5), 1.0) is None
    assert [r.request_id for r in second.load.requests] == ["r1", "r2"]
    assert not any(r.is_migratable for r in second.load.requests)


def test_pack_prefers_a_whole_fit_then_the_fullest_host_fit():
    policy = BalanceAndPackPolicy(pack_watermark=0.6, drain="newest")
    drained = replace(ReplicaLoad("a", 400, 48, 0, (layered("a1", 6),)), started_at=10.0)  # a1: 48 chunks
    b = with_host(replica("b", request("b1", 20)), 100, staged=False)  # 40 left: 1 host layer (36 chunks)
    c = with_host(replica("c", request("c1", 30)), 100, staged=False)  # 30 left: 2 host layers (24 chunks)
    # neither takes a1 whole (68, 78 > 60): the fullest that takes it with host layers
    assert plan(policy, [drained, b, c]) == [("a1", "a", "c", "pack")]
    assert plan(BalanceAndPackPolicy(pack_watermark=0.6, drain="newest"),
                [drained, replace(b, host=None), replace(c, host=None)]) == []
    d = replica("d", request("d1", 10))  # 58 <= 60: takes it whole, though it is the emptiest
    assert plan(BalanceAndPackPolicy(pack_watermark=0.6, drain="newest"), [drained, b, c, d]) == [
        ("a1", "a", "d", "pack")]


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
