"""The controller's bookkeeping around a migration policy (pure Python, no Ray, injectable clock; the
simulator runs it too, on its virtual clock).

Orders travel in the reply to the source replica's telemetry push. An order is *queued* until its source
reports next, then *delivered*; the source puts a delivered order into its `migrating` list before its
following report, so the first report after delivery that no longer lists it means the migration ended
(committed, aborted, or refused). Meanwhile the planner counts the order against both replicas'
concurrency (`max_concurrent` each), plans as if the request had already moved, and afterwards keeps the
request still for `cooldown_s` (no ping-pong). Orders that never end are dropped after `order_timeout_s`.
Forced orders (the admin endpoint, tests) name a request id (or an HTTP response id: its choices' ids are
`<response id>-<index>`) and wait up to `force_wait_s` for a replica to report it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from deployments.migration.policy import MigrationPolicy
from deployments.telemetry import MODES, MigrationOrder, ReplicaLoad

logger = logging.getLogger(__name__)


@dataclass
class _Tracked:
    order: MigrationOrder
    issued_at: float
    delivered_at: float | None = None


@dataclass(frozen=True)
class _Forced:
    request_id: str
    target: str | None
    mode: str
    expires_at: float


class MigrationPlanner:
    def __init__(self, policy: MigrationPolicy, max_concurrent: int = 2, plan_interval_s: float = 1.0,
                 cooldown_s: float = 10.0, order_timeout_s: float = 60.0, force_wait_s: float = 10.0,
                 clock: Callable[[], float] = time.time):
        self.policy = policy
        self.max_concurrent = max_concurrent
        self.plan_interval_s = plan_interval_s
        self.cooldown_s = cooldown_s
        self.order_timeout_s = order_timeout_s
        self.force_wait_s = force_wait_s
        self._clock = clock
        self._orders: dict[str, _Tracked] = {}
        self._cooldown_until: dict[str, float] = {}
        self._forced: list[_Forced] = []
        self._last_plan = float("-inf")
        self.num_orders = 0

    # ---- what replicas report ------------------------------------------------------------------------
    def observe(self, replica_id: str, migrating: tuple[str, ...] | list[str]) -> None:
        """A report from `replica_id`: its delivered orders missing from `migrating` have ended."""
        now = self._clock()
        for request_id, tracked in list(self._orders.items()):
            if tracked.order.source == replica_id and tracked.delivered_at is not None \
                    and request_id not in migrating:
                del self._orders[request_id]
                self._cooldown_until[request_id] = now + self.cooldown_s

    def take_orders(self, replica_id: str) -> tuple[MigrationOrder, ...]:
        """The queued orders whose source is `replica_id` (they are delivered now)."""
        now = self._clock()
        taken = []
        for tracked in self._orders.values():
            if tracked.order.source == replica_id and tracked.delivered_at is None:
                tracked.delivered_at = now
                taken.append(tracked.order)
        return tuple(taken)

    def forget_replica(self, replica_id: str) -> None:
        for request_id, tracked in list(self._orders.items()):
            if replica_id in (tracked.order.source, tracked.order.target):
                del self._orders[request_id]

    # ---- planning --------------------------------------------------------------------------------------
    def plan(self, replicas: dict[str, ReplicaLoad], force: bool = False) -> list[MigrationOrder]:
        """New orders (also queued for delivery); at most once per `plan_interval_s` unless forced."""
        now = self._clock()
        self._expire(now, replicas)
        orders = self._resolve_forced(now, replicas)
        for order in orders:
            self._track(order, now)
        if not force and now - self._last_plan < self.plan_interval_s:
            return orders
        self._last_plan = now
        loads, slots = self._effective(replicas)
        planned = self.policy.plan(list(loads.values()), slots, now)
        for order in planned:
            self._track(order, now)
        return orders + planned

    def _track(self, order: MigrationOrder, now: float) -> None:
        if order.request_id not in self._orders:
            self._orders[order.request_id] = _Tracked(order, now)
            self.num_orders += 1

    def _expire(self, now: float, replicas: dict[str, ReplicaLoad]) -> None:
        for request_id, tracked in list(self._orders.items()):
            order = tracked.order
            if now - tracked.issued_at > self.order_timeout_s or order.source not in replicas \
                    or order.target not in replicas:
                logger.warning("migration order %s dropped (%s): %s", request_id,
                               "delivered" if tracked.delivered_at else "queued", sorted(replicas))
                del self._orders[request_id]
        self._cooldown_until = {rid: until for rid, until in self._cooldown_until.items() if until > now}
        self._forced = [forced for forced in self._forced if forced.expires_at > now]

    def _effective(self, replicas: dict[str, ReplicaLoad]) -> tuple[dict[str, ReplicaLoad], dict[str, int]]:
        """Loads as if in-flight orders had completed, requests in flight or cooling down pinned, and the
        slots each replica has left."""
        loads = dict(replicas)
        slots = dict.fromkeys(replicas, self.max_concurrent)
        for tracked in self._orders.values():
            order = tracked.order
            slots[order.source] = slots.get(order.source, 0) - 1
            slots[order.target] = slots.get(order.target, 0) - 1
            source, target = loads.get(order.source), loads.get(order.target)
            request = next((r for r in source.requests if r.request_id == order.request_id), None) if source \
                else None
            if request is not None and target is not None:
                loads[order.source] = source.moved(request, incoming=False)
                placed = target.place(request, 1.0)  # a layerwise target may hold its top layers on its host
                loads[order.target] = placed.load if placed is not None else target.moved(request, incoming=True)
        for replica_id, load in loads.items():
            pinned = {r.request_id for r in load.requests if r.is_migratable and
                      (r.request_id in self._orders or r.request_id in self._cooldown_until)}
            if pinned:
                requests = tuple(replace(r, is_migratable=False) if r.request_id in pinned else r
                                 for r in load.requests)
                loads[replica_id] = replace(load, requests=requests)
        return loads, {replica_id: max(0, count) for replica_id, count in slots.items()}

    # ---- forced orders ---------------------------------------------------------------------------------
    def force(self, request_id: str, target: str | None = None, mode: str = "auto",
              replicas: dict[str, ReplicaLoad] | None = None) -> dict[str, Any]:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if target is not None and replicas is not None and target not in replicas:
            raise ValueError(f"no replica {target!r}; known: {sorted(replicas)}")
        now = self._clock()
        self._forced.append(_Forced(request_id, target, mode, now + self.force_wait_s))
        orders = self._resolve_forced(now, replicas or {})
        for order in orders:
            self._track(order, now)
        if orders:
            return {"status": "queued", "orders": [order.to_dict() for order in orders]}
        return {"status": "pending", "detail": f"waiting up to {self.force_wait_s} s for a replica to report it"}

    def _resolve_forced(self, now: float, replicas: dict[str, ReplicaLoad]) -> list[MigrationOrder]:
        orders, still_pending = [], []
        for forced in self._forced:
            found = [(replica_id, r.request_id) for replica_id, load in sorted(replicas.items())
                     for r in load.requests
                     if r.request_id == forced.request_id or r.request_id.startswith(forced.request_id + "-")]
            if not found:
                still_pending.append(forced)
                continue
            for source, engine_request_id in found:
                if engine_request_id in self._orders:
                    continue
                others = [r for r in replicas.values() if r.replica_id != source]
                target = forced.target or (min(others, key=lambda r: (r.load, r.replica_id)).replica_id
                                           if others else None)
                if target is None or target == source:
                    continue
                orders.append(MigrationOrder(engine_request_id, source, target, forced.mode, reason="forced"))
        self._forced = still_pending
        return orders

    # ---- what /v1/cluster shows -----------------------------------------------------------------------
    def view(self) -> dict[str, Any]:
        in_flight = [{**tracked.order.to_dict(), "state": "delivered" if tracked.delivered_at else "queued",
                      "age_s": round(self._clock() - tracked.issued_at, 3)} for tracked in self._orders.values()]
        return {"in_flight": in_flight, "num_orders": self.num_orders,
                "scale_down_candidates": self.policy.scale_down_candidates(),
                "pending_forced": [forced.request_id for forced in self._forced]}

