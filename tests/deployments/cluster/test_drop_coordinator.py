"""The cluster controller runs KunServe's drop plan over the replicas' typed reports and sends each replica
its LayerOrders in the reply: hysteresis before the drop, one order per pair while it is carried out, the
restore to the pair's leader after calm, at once to a survivor whose peer went silent."""

from __future__ import annotations

import asyncio

from deployments.cluster.controller import ClusterController
from deployments.cluster.drop_plan import DroppingConfig
from deployments.cluster.state import ClusterCore
from deployments.telemetry import DropStatus, LayerOrder, PairRendezvous, ReplicaLoad, ReplicaReport, ReplicaStats

CONFIG = DroppingConfig(enabled=True, high_watermark=0.9, restore_watermark=0.5, drop_after_s=1.0,
                        restore_after_s=5.0)


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


def report(used: int, waiting: int = 0, state: str = "normal", peer: str | None = None, dropped: int = 0,
           preemptions: int = 0) -> ReplicaReport:
    stats = ReplicaStats(kv_chunks_used=used, kv_chunks_free=100 + dropped * 10 - used, num_preemptions=preemptions)
    return ReplicaReport(stats, load=ReplicaLoad("x", 100, used, waiting),
                         dropping=DropStatus("m", 30, 10, state, peer, dropped))


def test_orders_follow_the_plan_with_hysteresis_and_reach_each_replica_once():
    clock = Clock()
    core = ClusterCore(stale_after_s=2.0, clock=clock, dropping=CONFIG)
    assert core.report("b", report(50)).layer_orders == ()
    assert core.report("a", report(95)).layer_orders == ()  # pressure starts (no overflow): hysteresis
    clock.now += 1.0
    # as a pair each side holds half the layers' KV of both: (95 + 50) / 2 fits, so one layer each (the
    # least a pair forms with); "a" < "b": a leads
    assert core.report("b", report(50)).layer_orders == (LayerOrder("drop", "follower", "a", 29, 1),)
    reply = core.report("a", report(95))
    assert reply.layer_orders == (LayerOrder("drop", "leader", "b", first_keeps=29, second_from=1),)
    assert core.report("b", report(50)).layer_orders == ()
    clock.now += 0.5  # still reporting normal (the order is on its way): never ordered twice
    assert core.report("a", report(95)).layer_orders == ()
    assert core.view()["parameter_dropping"]["replicas"]["a"]["state"] == "dropping"
    clock.now += 0.5
    core.report("a", report(30, state="dropped", peer="b", dropped=1))
    core.report("b", report(20, state="dropped", peer="a", dropped=1))
    assert core.view()["parameter_dropping"]["num_drops"] == 1
    orders = []
    for _ in range(5):  # calm for restore_after_s: the leader restores, the follower hears it from the leader
        clock.now += 1.0
        orders.append((core.report("b", report(20, state="dropped", peer="a", dropped=1)).layer_orders,
                       core.report("a", report(30, state="dropped", peer="b", dropped=1)).layer_orders))
    assert orders == [((), ())] * 4 + [((), (LayerOrder("restore", "leader", "b"),))]
    assert core.report("b", report(20, state="dropped", peer="a", dropped=1)).layer_orders == ()
    assert core.view()["parameter_dropping"]["replicas"]["b"]["state"] == "restoring"  # until it reports normal


def test_both_sides_of_a_drop_hear_where_to_meet_at_the_leaders_store():
    clock = Clock()
    core = ClusterCore(stale_after_s=2.0, clock=clock, dropping=CONFIG)

    def with_store(used: int, port: int) -> ReplicaReport:
        plain = report(used)
        return ReplicaReport(plain.stats, load=plain.load,
                             dropping=DropStatus("m", 30, 10, client_peak_chunks=used, store=("10.0.0.1", port)))

    core.report("b", with_store(50, 7002))
    to_a, = core.report("a", with_store(150, 7001)).layer_orders  # overflow: at once; "a" leads
    to_b, = core.report("b", with_store(50, 7002)).layer_orders
    assert (to_a.role, to_b.role) == ("leader", "follower")
    assert to_a.rendezvous == to_b.rendezvous == PairRendezvous("10.0.0.1", 7001, "pair/a+b@1000.000/")
    for side in ("a", "b"):  # the pair formed, then restored; the next drop meets under a new prefix
        core.report(side, report(30, state="dropped", peer="b" if side == "a" else "a", dropped=1))
    core.deregister("a")
    core.deregister("b")
    clock.now += 10.0
    core.report("b", with_store(50, 7002))
    again, = core.report("a", with_store(150, 7001)).layer_orders
    assert again.rendezvous.name == "pair/a+b@1010.000/"


def test_a_survivor_restores_at_once_when_its_peer_goes_silent():
    clock = Clock()
    core = ClusterCore(stale_after_s=2.0, clock=clock, dropping=CONFIG)
    # a restarted controller hears a dropped replica before its peer: it waits for the peer's report
    assert core.report("a", report(90, state="dropped", peer="b", dropped=3)).layer_orders == ()
    assert core.report("b", report(90, state="dropped", peer="a", dropped=3)).layer_orders == ()
    clock.now += 3.0  # b is stale
    assert core.report("a", report(90, state="dropped", peer="b", dropped=3)).layer_orders == (
        LayerOrder("restore", "leader", None),)


def test_disabled_or_unable_replicas_get_no_orders():
    core = ClusterCore(dropping=DroppingConfig())
    assert core.dropping is None and core.report("a", report(99, 99)).layer_orders == ()
    core = ClusterCore(dropping=CONFIG)
    plain = ReplicaReport(ReplicaStats(kv_chunks_used=99, kv_chunks_free=1))
    assert core.report("a", plain).layer_orders == () and core.view()["parameter_dropping"]["replicas"] == {}


def test_a_pair_still_under_pressure_is_ordered_to_drop_more_through_its_leader_once():
    clock = Clock()
    core = ClusterCore(stale_after_s=2.0, clock=clock, dropping=CONFIG)
    # formed: a dropped 2 layers, b 1; a's capacity 120 (100 + 2 x 10), 110 used + 5 queued: still pressed
    # (over 0.9 x 120) but not overflowing (the plan grows at once on an overflow)
    for _ in range(2):
        assert core.report("b", report(100, state="dropped", peer="a", dropped=1)).layer_orders == ()
        assert core.report("a", report(110, 5, state="dropped", peer="b", dropped=2)).layer_orders == ()
        clock.now += 0.5
    clock.now += 0.5
    assert core.report("b", report(100, state="dropped", peer="a", dropped=1)).layer_orders == ()
    # a: 110 + 5 - 0.9 x 120 = 7 -> 1 layer more; b: 100 + 5 - 0.9 x 110 = 6 -> 1 more
    assert core.report("a", report(110, 5, state="dropped", peer="b", dropped=2)).layer_orders == (
        LayerOrder("grow", "leader", "b", first_keeps=27, second_from=2),)
    for _ in range(3):  # carried out over the group: until both report it, both count as dropping
        clock.now += 1.0
        assert core.report("b", report(100, state="dropped", peer="a", dropped=1)).layer_orders == ()
        assert core.report("a", report(110, 5, state="dropped", peer="b", dropped=2)).layer_orders == ()
    view = core.view()["parameter_dropping"]
    assert view["num_grows"] == 1 and view["replicas"]["b"]["state"] == "dropping"
    core.report("b", report(100, state="dropped", peer="a", dropped=2))
    core.report("a", report(110, 5, state="dropped", peer="b", dropped=3))
    assert core.view()["parameter_dropping"]["replicas"]["a"]["state"] == "dropped"


def test_a_long_poll_hears_a_drop_made_on_the_other_replicas_report():
    """The controller answers a replica's `wait_layer_orders` as soon as the plan queues an order for it (here:
    the follower of a pair formed on the leader's report), and each order reaches the replica once."""
    async def main():
        controller = ClusterController(parameter_dropping={"enabled": True, "high_watermark": 0.9,
                                                           "restore_watermark": 0.5, "drop_after_s": 0.0})
        await controller.report("b", report(50))
        waiting = asyncio.ensure_future(controller.wait_layer_orders("b", 30.0))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        reply = await controller.report("a", report(150))  # overflow: a drop at once, "a" leads
        orders = await asyncio.wait_for(waiting, 1.0)
        again = (await controller.report("b", report(50))).layer_orders
        idle = await controller.wait_layer_orders("b", 0.05)
        return reply.layer_orders, orders, again, idle

    leader, follower, again, idle = asyncio.run(main())
    assert [order.role for order in leader] == ["leader"] and [order.role for order in follower] == ["follower"]
    assert again == () and idle == ()
