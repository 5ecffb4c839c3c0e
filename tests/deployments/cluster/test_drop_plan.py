"""KunServe's drop plan: a pure function over typed telemetry (the simulator runs the same code)."""

from __future__ import annotations

from dataclasses import replace

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


def test_hysteresis_then_only_as_much_as_the_pair_needs():
    replicas = [replica("a", 95), replica("b", 50), replica("c", 20, model="other")]
    first = plan_drops(replicas, CONFIG, None, 100.0)
    assert first.drops == () and dict(first.state.pressured_since) == {"a": 100.0}
    early = plan_drops(replicas, CONFIG, first.state, 100.5)
    assert early.drops == () and dict(early.state.pressured_since) == {"a": 100.0}
    plan = plan_drops(replicas, CONFIG, early.state, 101.0)
    # a alone needs 1 layer (95 vs 0.9 * 100); as a pair each side holds half the layers' KV of both
    # replicas' requests: (95 + 50) / 2 = 72.5 <= 90, so each drops the one layer a pair needs to form
    assert layers_to_drop(replicas[0], CONFIG) == 1 and layers_to_drop(replicas[1], CONFIG) == 0
    assert plan.drops == (DropOrder("a", "b", first_keeps=29, second_from=1),)
    assert dict(plan.state.pressured_since) == {}


def test_an_overflow_drops_at_once_sized_for_the_pair():
    # a's queue (waiting) or its running requests' growth to their last token exceed its whole capacity
    for a in (replica("a", 100, 100), replica("a", 60, 40, growth_chunks=100)):
        assert a.demand_chunks == 200
        plan = plan_drops([a, replica("b", 100, 60)], CONFIG, None, 100.0)
        # the pair's demand 360, each side runs 15 of 30 layers: 180 vs 0.9 * 100 -> 90 chunks = 10 layers each
        assert plan.drops == (DropOrder("a", "b", first_keeps=20, second_from=10),)
    near = plan_drops([replica("a", 60, 40), replica("b", 0)], CONFIG, None, 100.0)  # at capacity, not over
    assert near.drops == () and dict(near.state.pressured_since) == {"a": 100.0}
    # b's engine has not taken its spike in yet (its counts lag a step); its clients' requests count at arrival
    late = plan_drops([replica("a", 100, 100), replica("b", 0, client_peak_chunks=160)], CONFIG, None, 100.0)
    assert late.drops == (DropOrder("a", "b", first_keeps=20, second_from=10),)


def test_pressure_from_preemptions_or_ttft_pairs_the_two_most_pressured():
    replicas = [replica("a", 10, num_new_preemptions=2), replica("b", 95, 200), replica("c", 10),
                replica("d", 10, ttft_growth=5.0)]
    plan = plan_drops(replicas, CONFIG, PlanState({"a": 0.0, "b": 0.0, "d": 0.0}), 10.0)
    # b is the most loaded; its partner is the most loaded other pressured replica (a and d tie: id order):
    # (295 + 10) / 2 = 152.5 per side, 62.5 over 90 -> 7 layers each; a pairs with the one replica left and
    # drops one layer each as its KV demand needs none
    assert plan.drops == (DropOrder("b", "d", first_keeps=23, second_from=7),
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


def pair(used_a: int, used_b: int, waiting: int = 0, dropped: tuple[int, int] = (2, 1), **extra):
    return [replica("a", used_a, waiting, peer="b", state=DropState.DROPPED, dropped_layers=dropped[0], **extra),
            replica("b", used_b, peer="a", state=DropState.DROPPED, dropped_layers=dropped[1])]


def test_a_pair_under_pressure_drops_more_after_hysteresis_sized_per_side():
    pressed = pair(95, 88, waiting=5)
    first = plan_drops(pressed, CONFIG, None, 100.0)
    assert first.grows == () and dict(first.state.grow_since) == {"a": 100.0}
    assert plan_drops(pressed, CONFIG, first.state, 100.5).grows == ()
    plan = plan_drops(pressed, CONFIG, first.state, 101.0)
    # the queue (5 chunks, on the leader) waits for both sides: a 95 + 5 - 90 = 10 -> 2 layers more,
    # b 88 + 5 - 90 = 3 -> 1 more
    assert plan.grows == (DropOrder("a", "b", first_keeps=30 - 2 - 2, second_from=1 + 1),)
    assert dict(plan.state.grow_since) == {} and plan.drops == plan.restores == ()
    # once carried out, the pressure must last drop_after_s again
    assert plan_drops(pair(95, 88, 5, dropped=(4, 2)), CONFIG, plan.state, 101.5).grows == ()


def test_a_pair_that_overflows_grows_at_once_for_its_queue_and_growth():
    # a: 95 used + the pair's 20 queued > 100: no hysteresis; a 95 + 20 - 90 = 25 -> 3 more, b 10 -> 2 more
    assert plan_drops(pair(95, 80, waiting=20), CONFIG, None, 100.0).grows == (
        DropOrder("a", "b", first_keeps=30 - 2 - 3, second_from=1 + 2),)
    grows = pair(95, 80, waiting=5)
    grows[0] = replace(grows[0], growth_chunks=15)  # the running requests' growth counts as the queue does
    assert plan_drops(grows, CONFIG, None, 100.0).grows == (DropOrder("a", "b", first_keeps=25, second_from=3),)


def test_a_pair_counts_both_replicas_clients_still_arriving_and_grows_at_once_when_they_overflow():
    # a spike still arriving: the pair's scheduler holds 40 + 30 chunks a side, but the leader's clients' requests
    # will hold 70 a side and the follower's 45 (both in chunks of the layers each holds: half of 30 each)
    arriving = [replace(side, client_peak_chunks=peak) for side, peak in zip(pair(40, 30), (70, 45), strict=True)]
    plan = plan_drops(arriving, CONFIG, None, 100.0)  # 115 > 100 on both sides: no hysteresis
    # each side: 115 - 90 = 25 -> 3 layers more (a: 2 + 3 dropped, b: 1 + 3)
    assert plan.grows == (DropOrder("a", "b", first_keeps=30 - 2 - 3, second_from=1 + 3),)
    assert plan_drops(pair(40, 30), CONFIG, None, 100.0).grows == ()  # the engine's counts alone: no pressure


def test_a_pair_grows_only_the_side_that_needs_it_one_layer_each_on_preemptions_and_never_past_the_cap():
    only_a = plan_drops(pair(99, 10), CONFIG, PlanState(grow_since={"a": 0.0}), 5.0)
    assert only_a.grows == (DropOrder("a", "b", first_keeps=28 - 1, second_from=1),)
    signals = plan_drops(pair(10, 10, num_new_preemptions=1), CONFIG, PlanState(grow_since={"a": 0.0}), 5.0)
    assert signals.grows == (DropOrder("a", "b", first_keeps=27, second_from=2),)
    # TTFT growth in a formed pair is its compute: no grow without a memory deficit or preemptions
    slow = plan_drops(pair(10, 10, ttft_growth=9.0), CONFIG, PlanState(grow_since={"a": 0.0}), 5.0)
    assert slow.grows == () and dict(slow.state.grow_since) == {}
    capped = plan_drops(pair(100, 100, 500, dropped=(14, 15)), CONFIG, PlanState(grow_since={"a": 0.0}), 5.0)
    assert capped.grows == (DropOrder("a", "b", first_keeps=15, second_from=15),)
    at_cap = plan_drops(pair(100, 100, 500, dropped=(15, 15)), CONFIG, PlanState(grow_since={"a": 0.0}), 5.0)
    assert at_cap.grows == () and dict(at_cap.state.grow_since) == {}
    calm = plan_drops(pair(50, 50), CONFIG, PlanState(grow_since={"a": 0.0}), 5.0)
    assert calm.grows == () and dict(calm.state.grow_since) == {}


def test_the_plans_stage_sizes_are_the_pipelines_cut():
    """drop_plan restates pipeline_split's middle cut (the controller stays free of torch): the two agree for
    every drop the plan can order (each side at most max_drop_fraction <= 0.5 of the layers)."""
    from deployments.cluster.drop_plan import stage_layers
    from engine.cooperative.pipeline import pipeline_split

    for num_layers in range(2, 65):
        cap = num_layers // 2
        for first_drops in range(1, cap + 1):
            for second_drops in range(1, cap + 1):
                split = pipeline_split(num_layers, num_layers - first_drops, second_drops)
                assert stage_layers(num_layers) == (split, num_layers - split)
