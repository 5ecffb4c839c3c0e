"""KunServe's drop plan: which replicas of one model pair up and drop complementary layers, and how many.

A pure function over typed per-replica telemetry (`DropTelemetry`), the previous plan state and the
clock, so the cluster controller and the simulator (loadtest/sim) run the same code:

    plan = plan_drops(replicas, config, previous_state, now)   # -> DropPlan(orders, state)

Demand: a replica's KV in use, what its queued requests wait for, and what its requests' KV will still
grow by until their last possible token (`growth_chunks`: max_tokens or the context limit; EOS may end
them sooner, so it is an upper bound) — at least what its own clients' requests will hold at their last
tokens counted from their arrival (`client_peak_chunks`), as the engine's counts lag by a step. Counting
the growth is what sees a spike coming: requests that were all admitted at once would otherwise look like
a fit until their pages run out mid-decode and they are preempted one by one.

Pressure on a replica: its demand over its KV capacity is at or above `high_watermark`, or it preempted
requests since its last report, or its TTFT grew by `ttft_growth_trigger` or more over its baseline.
Hysteresis: a replica must stay under pressure for `drop_after_s` before it drops, unless it overflows
(its demand exceeds its whole capacity: requests will queue or be preempted for memory, which only more
memory ends), which drops at once; a dropped pair must stay at or below `restore_watermark` (its demand
over the capacity it will have once restored) for `restore_after_s` before it restores.

Pairing: pressured replicas, most pressured first, each with the most pressured free replica of the same
model (else the least loaded one). Only as much is dropped as the demand needs (the paper's "no
unnecessary cooperation"), sized for the pair as it will run: the pipeline cuts the model in the middle
(engine/cooperative/pipeline.py `pipeline_split`), so each side holds the KV of its half of the layers for
both replicas' requests, and a side's demand is the pair's demand times its share of the layers. A side
drops ceil(its deficit / chunks per layer) layers, where the deficit is what lifts that demand back to
`high_watermark` of its capacity, capped at `max_drop_fraction` of its layers; the first of a pair drops
its last layers and the second its first layers, never together more than all of them, so the pair still
holds a full copy. A side with no deficit still drops one layer (no pair forms with nothing dropped). A
dropped replica whose peer is gone (no fresh report) restores at once, alone.

Growing: a dropped pair still under pressure drops more, up to `max_drop_fraction` each (`DropPlan.grows`: the
pair's new `first_keeps` / `second_from`), after `drop_after_s` (counted again from each drop or grow carried
out), or at once if a side overflows. Each side of the pipeline holds the KV of its own layers, and the queued
requests (on the leader's queue: the pair's scheduler) wait for KV on both, so each side's load is (its used
KV + the pair's queued demand and growth) / its capacity, at least both replicas' clients' requests at their
last tokens (a spike still arriving: requests not in the pair's scheduler yet); a side drops ceil(its deficit
/ chunks per layer) more layers, or one more on each side when the pressure is preemptions only (TTFT growth
does not grow a pair: in a formed pair it is the pipeline's compute, which more memory does not buy). The
pipeline's cut stays where it is: with `max_drop_fraction` <= 0.5 the layers dropped are never the ones a side
runs.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.telemetry import ReplicaLoad


class DropState(str, enum.Enum):
    NORMAL = "normal"
    DROPPING = "dropping"
    DROPPED = "dropped"
    RESTORING = "restoring"


@dataclass(frozen=True)
class DroppingConfig:
    enabled: bool = False
    high_watermark: float = 0.9  # KV demand / capacity that counts as pressure (and the target after dropping)
    restore_watermark: float = 0.6  # a dropped pair restores once its demand fits under this, restored
    max_drop_fraction: float = 0.5  # at most this share of a replica's layers is dropped
    drop_after_s: float = 1.0  # pressure must last this long before a drop
    restore_after_s: float = 5.0  # calm must last this long before a restore
    ttft_growth_trigger: float = 4.0  # TTFT at this multiple of its baseline counts as pressure

    def __post_init__(self) -> None:
        if not 0 < self.restore_watermark < self.high_watermark <= 1.5:
            raise ValueError("need 0 < restore_watermark < high_watermark <= 1.5")
        if not 0 < self.max_drop_fraction <= 0.5:
            raise ValueError("max_drop_fraction must be in (0, 0.5]: a pair must keep a full copy")
        if self.drop_after_s < 0 or self.restore_after_s < 0 or self.ttft_growth_trigger <= 1:
            raise ValueError("hysteresis times must be >= 0 and ttft_growth_trigger > 1")


@dataclass(frozen=True)
class DropTelemetry:
    """What the plan needs from one replica (a subset of its report)."""

    replica_id: str
    model: str
    num_layers: int
    chunks_per_layer: int  # device chunks one layer's weights take
    # what KV could hold now (dropped layers' chunks included): the budget less the weights and a full step's
    # workspace (LLMEngine.kv_capacity_chunks), what the scheduler admits against
    capacity_chunks: int
    used_chunks: int
    waiting_chunks: int = 0  # KV the queued requests wait for
    num_new_preemptions: int = 0  # since the previous report
    ttft_growth: float = 1.0  # recent TTFT / baseline TTFT
    state: DropState = DropState.NORMAL
    peer: str | None = None  # the partner while not NORMAL
    dropped_layers: int = 0
    growth_chunks: int = 0  # what its requests' KV will still grow by (ReplicaLoad.growth_chunks)
    # the KV its own clients' requests hold at their last tokens, counted from arrival (DropStatus): a floor
    # for the demand while the engine's counts lag (a long step, requests not yet taken in)
    client_peak_chunks: int = 0

    @classmethod
    def from_load(cls, load: ReplicaLoad, model: str, num_layers: int, chunks_per_layer: int,
                  capacity_chunks: int, **fields: Any) -> DropTelemetry:
        """From the `ReplicaLoad` migration policies plan with (deployments/telemetry.py): its used, waiting and
        growth chunks; the capacity the scheduler admits against (not the load's used + free, which counts
        the activations' workspace); the dropping fields (preemptions, TTFT growth, state, peer) by name."""
        return cls(load.replica_id, model, num_layers, chunks_per_layer, capacity_chunks, load.used_chunks,
                   load.waiting_chunks, growth_chunks=load.growth_chunks, **fields)

    @property
    def demand_chunks(self) -> int:
        return max(self.used_chunks + self.queued_chunks, self.client_peak_chunks)

    @property
    def queued_chunks(self) -> int:
        """What the engine's requests will still take: the queue's KV and the running requests' growth."""
        return self.waiting_chunks + self.growth_chunks

    def load(self) -> float:
        return self.demand_chunks / self.capacity_chunks if self.capacity_chunks else math.inf

    def restored_capacity(self) -> int:
        return self.capacity_chunks - self.dropped_layers * self.chunks_per_layer


@dataclass(frozen=True)
class DropOrder:
    first: str  # keeps layers [0, first_keeps)
    second: str  # keeps layers [second_from, num_layers)
    first_keeps: int
    second_from: int


@dataclass(frozen=True)
class RestoreOrder:
    first: str
    second: str | None  # None: the peer is gone (no fresh report); `first` restores alone, at once


@dataclass(frozen=True)
class PlanState:
    pressured_since: Mapping[str, float] = field(default_factory=dict)  # replica -> when pressure began
    calm_since: Mapping[str, float] = field(default_factory=dict)  # first of a dropped pair -> when calm began
    grow_since: Mapping[str, float] = field(default_factory=dict)  # first of a dropped pair -> pressure began


@dataclass(frozen=True)
class DropPlan:
    drops: tuple[DropOrder, ...]
    restores: tuple[RestoreOrder, ...]
    state: PlanState
    grows: tuple[DropOrder, ...] = ()  # dropped pairs dropping more: their new first_keeps / second_from


def is_pressured(replica: DropTelemetry, config: DroppingConfig) -> bool:
    return (replica.load() >= config.high_watermark or replica.num_new_preemptions > 0
            or replica.ttft_growth >= config.ttft_growth_trigger)


def is_overflowing(replica: DropTelemetry) -> bool:
    """Its demand exceeds its whole KV capacity: requests will queue or be preempted for memory."""
    return replica.demand_chunks > replica.capacity_chunks


def layers_for(demand: float, capacity: int, chunks_per_layer: int, config: DroppingConfig) -> int:
    """Fewest layers whose chunks bring `demand` down to high_watermark of `capacity` (0 if none needed)."""
    deficit = demand - config.high_watermark * capacity
    return math.ceil(deficit / (config.high_watermark * max(1, chunks_per_layer))) if deficit > 0 else 0


def layers_to_drop(replica: DropTelemetry, config: DroppingConfig) -> int:
    """Fewest layers whose chunks bring the replica's own demand down to high_watermark (0 if none needed)."""
    return layers_for(replica.demand_chunks, replica.capacity_chunks, replica.chunks_per_layer, config)


def stage_layers(num_layers: int) -> tuple[int, int]:
    """How many layers each side of a pair runs: the pipeline cuts in the middle (`pipeline_split`, which
    `max_drop_fraction` <= 0.5 never moves). Restated here, not imported: engine/cooperative/pipeline.py brings
    torch and the engine into the controller; tests/deployments/cluster/test_drop_plan.py holds the two equal."""
    return num_layers // 2, num_layers - num_layers // 2


def plan_drops(replicas: Sequence[DropTelemetry], config: DroppingConfig, previous: PlanState | None = None,
               now: float = 0.0) -> DropPlan:
    previous = previous or PlanState()
    if not config.enabled:
        return DropPlan((), (), PlanState())
    by_id = {replica.replica_id: replica for replica in replicas}
    pressured_since = {r.replica_id: previous.pressured_since.get(r.replica_id, now)
                       for r in replicas if r.state is DropState.NORMAL and is_pressured(r, config)}
    restores, calm_since = _restores(replicas, by_id, config, previous, now)
    grows, grow_since = _grows(replicas, by_id, config, previous, now)
    ready = sorted((by_id[rid] for rid, since in pressured_since.items()
                    if now - since >= config.drop_after_s or is_overflowing(by_id[rid])),
                   key=lambda r: (-r.load(), r.replica_id))
    free = {r.replica_id for r in replicas if r.state is DropState.NORMAL}
    drops = []
    for replica in ready:
        if replica.replica_id not in free:
            continue
        partner = _partner(replica, [by_id[rid] for rid in free if rid != replica.replica_id], pressured_since)
        if partner is None:
            continue
        order = _drop_order(replica, partner, config)
        drops.append(order)
        free -= {replica.replica_id, partner.replica_id}
    paired = {rid for order in drops for rid in (order.first, order.second)}
    state = PlanState({rid: since for rid, since in pressured_since.items() if rid not in paired}, calm_since,
                      grow_since)
    return DropPlan(tuple(drops), tuple(restores), state, tuple(grows))


def _partner(replica: DropTelemetry, candidates: list[DropTelemetry],
             pressured_since: Mapping[str, float]) -> DropTelemetry | None:
    same = [c for c in candidates if c.model == replica.model and c.num_layers == replica.num_layers]
    if not same:
        return None
    pressured = [c for c in same if c.replica_id in pressured_since]
    if pressured:
        return max(pressured, key=lambda c: (c.load(), c.replica_id))
    return min(same, key=lambda c: (c.load(), c.replica_id))


def _drop_order(a: DropTelemetry, b: DropTelemetry, config: DroppingConfig) -> DropOrder:
    first, second = sorted((a, b), key=lambda r: r.replica_id)  # a stable role per pair
    cap = _drop_cap(first, config)
    pair_demand = first.demand_chunks + second.demand_chunks
    runs = stage_layers(first.num_layers)
    first_drops, second_drops = (
        min(cap, max(1, layers_for(pair_demand * share / side.num_layers, side.capacity_chunks,
                                   side.chunks_per_layer, config)))
        for side, share in zip((first, second), runs, strict=True))
    second_drops = min(second_drops, first.num_layers - first_drops)
    return DropOrder(first.replica_id, second.replica_id, first.num_layers - first_drops, second_drops)


def _drop_cap(replica: DropTelemetry, config: DroppingConfig) -> int:
    return max(1, math.floor(config.max_drop_fraction * replica.num_layers))


def _side_demand(side: DropTelemetry, other: DropTelemetry, queued: int) -> float:
    """One side of a dropped pair: its used KV plus the pair's queued demand (the leader's scheduler holds
    the queue, which waits for KV on both sides), at least both replicas' clients' requests at their last
    tokens (each reports them in chunks of the layers it holds: the other's scaled to this side's), which
    counts a spike's requests that arrived but are not in the pair's scheduler yet."""
    runs = dict(zip((side.replica_id, other.replica_id), _stage_runs(side, other), strict=True))
    peak = side.client_peak_chunks + other.client_peak_chunks * runs[side.replica_id] / runs[other.replica_id]
    return max(side.used_chunks + queued, peak)


def _stage_runs(a: DropTelemetry, b: DropTelemetry) -> tuple[int, int]:
    """The layers a and b run in their pair (the first, by id, runs the first half)."""
    first_runs, second_runs = stage_layers(a.num_layers)
    return (first_runs, second_runs) if a.replica_id < b.replica_id else (second_runs, first_runs)


def _grows(replicas: Sequence[DropTelemetry], by_id: Mapping[str, DropTelemetry], config: DroppingConfig,
           previous: PlanState, now: float) -> tuple[list[DropOrder], dict[str, float]]:
    grows, grow_since = [], {}
    for first in sorted(replicas, key=lambda r: r.replica_id):
        second = by_id.get(first.peer) if first.peer else None
        if first.state is not DropState.DROPPED or second is None or second.state is not DropState.DROPPED \
                or first.replica_id > second.replica_id:
            continue
        # the pair's queue and its requests' growth (the leader's scheduler holds them) need both sides
        queued = max(first.queued_chunks, second.queued_chunks)
        demand = [_side_demand(first, second, queued), _side_demand(second, first, queued)]
        more = [layers_for(want, side.capacity_chunks, side.chunks_per_layer, config)
                for want, side in zip(demand, (first, second), strict=True)]
        # preemptions mean memory ran short; TTFT growth in a formed pair is the pipeline's compute, which
        # dropping more does not buy (measured: docs/KUNSERVE.md), so it does not grow a pair
        signals = any(r.num_new_preemptions > 0 for r in (first, second))
        if not any(more) and not signals:
            continue
        if not any(more):
            more = [1, 1]
        room = [_drop_cap(side, config) - side.dropped_layers for side in (first, second)]
        more = [min(want, max(0, left)) for want, left in zip(more, room, strict=True)]
        if not any(more):
            continue  # at the cap: the pair serves with what it has
        since = previous.grow_since.get(first.replica_id, now)
        overflowing = any(want > side.capacity_chunks for want, side in zip(demand, (first, second), strict=True))
        if now - since < config.drop_after_s and not overflowing:
            grow_since[first.replica_id] = since
            continue
        grows.append(DropOrder(first.replica_id, second.replica_id,
                               first.num_layers - first.dropped_layers - more[0], second.dropped_layers + more[1]))
    return grows, grow_since


def _restores(replicas: Sequence[DropTelemetry], by_id: Mapping[str, DropTelemetry], config: DroppingConfig,
              previous: PlanState, now: float) -> tuple[list[RestoreOrder], dict[str, float]]:
    restores, calm_since = [], {}
    for replica in sorted(replicas, key=lambda r: r.replica_id):
        if replica.state is not DropState.DROPPED:
            continue
        peer = by_id.get(replica.peer) if replica.peer else None
        if peer is None:  # its partner died or went silent: it must hold every layer again now
            restores.append(RestoreOrder(replica.replica_id, None))
            continue
        if replica.replica_id > peer.replica_id:
            continue
        demand = replica.demand_chunks + peer.demand_chunks
        capacity = replica.restored_capacity() + peer.restored_capacity()
        if capacity > 0 and demand <= config.restore_watermark * capacity and peer.state is DropState.DROPPED:
            since = previous.calm_since.get(replica.replica_id, now)
            if now - since >= config.restore_after_s:
                restores.append(RestoreOrder(replica.replica_id, peer.replica_id))
            else:
                calm_since[replica.replica_id] = since
    return restores, calm_since
