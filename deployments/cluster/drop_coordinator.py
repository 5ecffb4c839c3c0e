"""KunServe in the cluster controller: `plan_drops` (drop_plan.py) run over the replicas' reports, its
orders turned into `LayerOrder`s delivered with each replica's next `ControllerReply`.

Pure (no Ray), so the controller actor and the simulator run it alike. Per report it builds the replica's
`DropTelemetry` from the typed report (deployments/telemetry.py): KV capacity and use from its stats,
what its queued requests wait for from its load, new preemptions since its previous report, and its
`DropStatus` (layers, chunks per layer, state, peer, TTFT growth). Hysteresis is the plan's own
(`drop_after_s`, `restore_after_s` of `parameter_dropping:`).

Between an order and the replica carrying it out (it acts on its next reply, up to a telemetry period later),
the replica still reports `normal` (or `dropped`): the coordinator counts it as `dropping` (or `restoring`)
with its new peer until its report shows the ordered state, or `order_timeout_s` passed, so a pair is never
ordered twice. A drop reaches both replicas, each in its own next reply, with where they meet
(`PairRendezvous`: the leader's store, reported in its `DropStatus`, and a key prefix new to the pair): each
starts forming its side as soon as it hears, neither waits for a call from the other. The pair's leader
(`DropOrder.first`, which keeps the first layers) runs the pair's scheduler and starts the restore; the
follower learns of it from the leader (engine/cooperative/follower.py), so a restore order goes to the leader
only, or to the survivor of a pair whose peer is gone. So does a grow (the plan's `grows`: a pair still under
pressure drops more); both replicas count as `dropping` until they report the grown number of dropped layers.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from deployments.cluster.drop_plan import DroppingConfig, DropState, DropTelemetry, PlanState, plan_drops
from deployments.telemetry import LayerOrder, PairRendezvous, ReplicaReport

logger = logging.getLogger(__name__)


class DropCoordinator:
    def __init__(self, config: DroppingConfig, clock: Callable[[], float] = time.time, order_timeout_s: float = 30.0):
        self.config = config
        self.clock = clock
        self.order_timeout_s = order_timeout_s
        self.plan_state = PlanState()
        self.num_drops = 0
        self.num_restores = 0
        self.num_grows = 0
        self._telemetry: dict[str, DropTelemetry] = {}
        self._preemptions: dict[str, int] = {}
        self._roles: dict[str, tuple[str, str | None]] = {}  # replica -> (role, peer) in its current pair
        # ordered state, peer, when, and the dropped layers it must report (a grow keeps the state)
        self._ordered: dict[str, tuple[DropState, str | None, float, int]] = {}
        self._orders: dict[str, list[LayerOrder]] = {}
        self._stores: dict[str, tuple[str, int]] = {}  # replica -> its store, where the pairs it leads meet
        self.recent: deque[dict[str, Any]] = deque(maxlen=32)  # the last drops and grows, with their telemetry

    def observe(self, replica_id: str, report: ReplicaReport) -> None:
        status = report.dropping
        if status is None:
            self.forget(replica_id)
            return
        if status.store is not None:
            self._stores[replica_id] = status.store
        stats = report.stats
        previous = self._preemptions.get(replica_id, stats.num_preemptions)
        self._preemptions[replica_id] = stats.num_preemptions
        state, peer = DropState(status.state), status.peer
        ordered = self._ordered.get(replica_id)
        if ordered is not None:
            target, ordered_peer, since, at_least = ordered
            done = state is target and (target is not DropState.DROPPED or status.dropped_layers >= at_least)
            if done or self.clock() - since > self.order_timeout_s:
                del self._ordered[replica_id]
            else:  # the order is on its way: count the replica as already changing
                state = DropState.DROPPING if target is DropState.DROPPED else DropState.RESTORING
                peer = ordered_peer
        load = report.load
        self._telemetry[replica_id] = DropTelemetry(
            replica_id, status.model, status.num_layers, status.chunks_per_layer,
            status.kv_capacity_chunks or stats.kv_chunks_used + stats.kv_chunks_free, stats.kv_chunks_used,
            load.waiting_chunks if load is not None else 0,
            max(0, stats.num_preemptions - previous), status.ttft_growth, state, peer, status.dropped_layers,
            load.growth_chunks if load is not None else 0, status.client_peak_chunks)

    def plan(self, fresh: Iterable[str]) -> None:
        """Runs the plan over the replicas with a fresh report and queues its orders."""
        fresh = set(fresh)
        # a dropped replica whose peer never reported here (the controller restarted) waits for it: only a
        # peer that went silent counts as gone (a dead one ends the pair in the replicas themselves too)
        replicas = [telemetry for rid, telemetry in sorted(self._telemetry.items()) if rid in fresh
                    and (telemetry.peer is None or telemetry.peer in self._telemetry)]
        now = self.clock()
        plan = plan_drops(replicas, self.config, self.plan_state, now)
        self.plan_state = plan.state
        for action, orders in (("drop", plan.drops), ("grow", plan.grows)):
            for order in orders:
                why = "; ".join(_describe(t) for t in replicas if t.replica_id in (order.first, order.second))
                self.recent.append({"time": round(now, 3), "action": action, "first": order.first,
                                    "first_keeps": order.first_keeps, "second": order.second,
                                    "second_from": order.second_from, "why": why})
                logger.info("parameter dropping: %s %s keeps [0, %d), %s [%d, L); %s", action, order.first,
                            order.first_keeps, order.second, order.second_from, why)
        for drop in plan.drops:
            store = self._stores.get(drop.first)
            meet = PairRendezvous(*store, f"pair/{drop.first}+{drop.second}@{now:.3f}/") if store else None
            self._order(drop.first, LayerOrder("drop", "leader", drop.second, drop.first_keeps, drop.second_from,
                                               meet), DropState.DROPPED, now)
            self._order(drop.second, LayerOrder("drop", "follower", drop.first, drop.first_keeps, drop.second_from,
                                                meet), DropState.DROPPED, now)
            self.num_drops += 1
        for grow in plan.grows:  # to the leader, which tells the follower over the pair's group
            num_layers = self._telemetry[grow.first].num_layers
            self._orders.setdefault(grow.first, []).append(
                LayerOrder("grow", "leader", grow.second, grow.first_keeps, grow.second_from))
            self._ordered[grow.first] = (DropState.DROPPED, grow.second, now, num_layers - grow.first_keeps)
            self._ordered[grow.second] = (DropState.DROPPED, grow.first, now, grow.second_from)
            self.num_grows += 1
        for restore in plan.restores:
            role, _ = self._roles.get(restore.first, ("leader", None))
            self._order(restore.first, LayerOrder("restore", role, restore.second), DropState.NORMAL, now)
            if restore.second is not None:
                self._ordered[restore.second] = (DropState.NORMAL, restore.first, now, 0)
            self.num_restores += 1

    def _order(self, replica_id: str, order: LayerOrder, target: DropState, now: float) -> None:
        self._orders.setdefault(replica_id, []).append(order)
        self._ordered[replica_id] = (target, order.peer, now, 0)
        if order.action == "drop":
            self._roles[replica_id] = (order.role, order.peer)
        else:
            self._roles.pop(replica_id, None)

    def take_orders(self, replica_id: str) -> tuple[LayerOrder, ...]:
        return tuple(self._orders.pop(replica_id, ()))

    def with_orders(self) -> list[str]:
        """The replicas whose orders wait for them."""
        return [replica_id for replica_id, orders in self._orders.items() if orders]

    def forget(self, replica_id: str) -> None:
        for table in (self._telemetry, self._preemptions, self._roles, self._ordered, self._orders, self._stores):
            table.pop(replica_id, None)

    def view(self) -> dict[str, Any]:
        """The `parameter_dropping` part of /v1/cluster."""
        return {"enabled": self.config.enabled, "num_drops": self.num_drops, "num_restores": self.num_restores,
                "num_grows": self.num_grows, "recent_orders": list(self.recent),
                "replicas": {rid: {"state": t.state.value, "peer": t.peer, "dropped_layers": t.dropped_layers,
                                   "kv_load": round(t.load(), 4)} for rid, t in sorted(self._telemetry.items())}}


def _describe(telemetry: DropTelemetry) -> str:
    return (f"{telemetry.replica_id} {telemetry.state.value}: KV used {telemetry.used_chunks} + waiting "
            f"{telemetry.waiting_chunks} + growth {telemetry.growth_chunks} (its clients' peak "
            f"{telemetry.client_peak_chunks}) of {telemetry.capacity_chunks} chunks, "
            f"{telemetry.num_new_preemptions} preempted, TTFT x{telemetry.ttft_growth:.1f}")
