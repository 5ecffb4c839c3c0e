"""KunServe's drop plan: a pure function over typed telemetry (the simulator runs the same code)."""

from __future__ import annotations

import pytest

from deployments.cluster.drop_plan import (
    DropOrder,
    DroppingConfig,
    DropState,
    DropTelemetry,
    PlanState,
    RestoreOrder,
    layers_to_drop,
    plan_drops,
)

CONFIG = DroppingConfig(enabled=True, high_watermark=0.9, restore_watermark=0.5, max_drop_fraction=0.5,
                        drop_after_s=1.0, restore_after_s=5.0)


def replica(rid: str, used: int, waiting: int = 0, model: str = "m", **extra) -> DropTelemetry:
    return DropTelemetry(rid, model, num_layers=30, chunks_per_layer=10, capacity_chunks=100, used_chunks=used,
                         waiting_chunks=waiting, **extra)


def test_disabled_plans_nothing():
    plan = plan_drops([replica("a", 100, 100), replica("b", 100, 100)], DroppingConfig(), None, 10.0)
    assert (plan.drops, plan.restores, plan.state) == ((), (), PlanState())


def test_hysteresis_then_only_as_much_as_the_demand_needs():
    replicas = [replica("a", 95, 40), replica("b", 50), replica("c", 20, model="other")]
    first = plan_drops(replicas, CONFIG, None, 100.0)
    assert first.drops == () and dict(first.state.pressured_since) == {"a": 100.0}
    early = plan_drops(replicas, CONFIG, first.state, 100.5)
    assert early.drops == () and dict(early.state.pressured_since) == {"a": 100.0}
    plan = plan_drops(replicas, CONFIG, early.state, 101.0)
    # a: demand 135 vs 0.9 * 100 -> deficit 45 chunks -> ceil(45 / 9) = 5 layers; b needs none, drops one
    assert layers_to_drop(replicas[0], CONFIG) == 5 and layers_to_drop(replicas[1], CONFIG) == 0
    assert plan.drops == (DropOrder("a", "b", first_keeps=25, second_from=1),)
    assert dict(plan.state.pressured_since) == {}


def test_pressure_from_preemptions_or_ttft_pairs_the_two_most_pressured():
    replicas = [replica("a", 10, num_new_preemptions=2), replica("b", 95, 200), replica("c", 10),
                replica("d", 10, ttft_growth=5.0)]
    plan = plan_drops(replicas, CONFIG, PlanState({"a": 0.0, "b": 0.0, "d": 0.0}), 10.0)
    # b is the most loaded; its partner is the most loaded other pressured replica (a and d tie: id order);
    # a pairs with the one replica left, and drops one layer each as its KV demand needs none
    assert plan.drops == (DropOrder("b", "d", first_keeps=15, second_from=1),
                          DropOrder("a", "c", first_keeps=29, second_from=1))
    assert dict(plan.state.pressured_since) == {}


def test_cap_keeps_a_full_copy():
    replicas = [replica("a", 100, 1000), replica("b", 100, 1000)]
    plan = plan_drops(replicas, CONFIG, PlanState({"a": 0.0, "b": 0.0}), 5.0)
    assert plan.drops == (DropOrder("a", "b", first_keeps=15, second_from=15),)
    with pytest.raises(ValueError):
        DroppingConfig(max_drop_fraction=0.6)


def test_restore_after_calm_and_at_once_when_the_peer_is_gone():
    dropped = dict(state=DropState.DROPPED, dropped_layers=5)
    # capacity 100 includes 50 freed chunks: restored capacity 50 each, demand 40 of 100 <= 0.5
    calm = [replica("a", 20, peer="b", **dropped), replica("b", 20, peer="a", **dropped)]
    first = plan_drops(calm, CONFIG, None, 50.0)
    assert first.restores == () and dict(first.state.calm_since) == {"a": 50.0}
    assert plan_drops(calm, CONFIG, first.state, 55.0).restores == (RestoreOrder("a", "b"),)
    busy = [replica("a", 40, peer="b", **dropped), replica("b", 20, peer="a", **dropped)]
    assert dict(plan_drops(busy, CONFIG, first.state, 56.0).state.calm_since) == {}  # calm broken: starts over
    orphan = [replica("a", 90, peer="gone", **dropped)]
    assert plan_drops(orphan, CONFIG, None, 1.0).restores == (RestoreOrder("a", None),)
