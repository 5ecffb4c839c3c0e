"""Migration policies: which running request moves from which replica to which (pure Python, no Ray).

The one implementation: the ClusterController (deployments/cluster/controller.py, through
deployments/migration/planner.py) and the simulator (loadtest/sim) both run these classes over the typed
telemetry of deployments/telemetry.py.

A policy sees one `ReplicaLoad` per fresh replica (KV chunks used, what its waiting requests need, its
running requests) with the migrations already in flight applied, and how many more migrations each replica
may take part in now (`slots`). It returns `MigrationOrder`s. Policies are chosen by name from
`MIGRATION_POLICIES` (`migration_policy` in serve_config.yaml, knobs in `migration_policy_options`):

- `none`: never migrates.
- `balance` (Llumnix-style load balancing): while the most loaded replica's KV use, waiting requests' needs
  included, is above `high_watermark` and the least loaded one is below `low_watermark`, move a migratable
  request from the first to the second, only if the load gap shrinks and the destination stays at or below
  `high_watermark`. `selection` picks the request: `best_fit` (the one whose KV is closest to what would
  equalise the two loads) or `shortest_remaining` (fewest tokens left to generate).
- `balance+pack` (Mell's online bin-packing on top of balance): when balance has nothing to do and the
  cluster's load would fit on one replica fewer (every other replica at most `pack_watermark` full), drain
  the least loaded replica into the others, largest request first into the fullest replica it fits
  (best-fit decreasing), at most `pack_budget` migrations per `pack_interval_s`. The drained replica is a
  scale-down candidate (shown in /v1/cluster; the router sends it new requests last). With `drain: newest`
  it drains the newest replica instead, the one Ray Serve stops first when it scales down: with the
  `kv_packing_policy` autoscaling policy (deployments/cluster/autoscaling.py), Serve removes it once it is empty.

"Fits" is `ReplicaLoad.place`: a destination takes a request whole when its KV keeps the destination at or
below the watermark; a `kv_offload: layerwise` destination (its `host` reported) also takes one whose device
part does, with its fewest top layers on the host (the destination's own import rule, engine/host_split.py),
as long as its host holds them. Packing prefers a destination that takes the request whole (host layers cost
TPOT where they are copied in); balance takes the first request that fits in its selection order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from deployments.telemetry import MODES, MigrationOrder, Placement, ReplicaLoad, RequestLoad

__all__ = ["MIGRATION_POLICIES", "MODES", "BalanceAndPackPolicy", "BalancePolicy", "MigrationOrder",
           "MigrationPolicy", "NoMigration", "ReplicaLoad", "RequestLoad", "create_migration_policy"]


class MigrationPolicy(ABC):
    name: str

    @abstractmethod
    def plan(self, replicas: list[ReplicaLoad], slots: dict[str, int], now: float) -> list[MigrationOrder]:
        """Migrations to start now. `slots[replica]`: how many more it may take part in (source or target)."""

    def scale_down_candidates(self) -> list[str]:
        return []


class NoMigration(MigrationPolicy):
    name = "none"

    def plan(self, replicas, slots, now):
        return []


@dataclass
class BalancePolicy(MigrationPolicy):
    high_watermark: float = 0.8
    low_watermark: float = 0.5
    selection: str = "best_fit"  # best_fit | shortest_remaining
    max_per_round: int = 2
    mode: str = "auto"
    name = "balance"

    def __post_init__(self) -> None:
        if not 0 < self.low_watermark <= self.high_watermark:
            raise ValueError("need 0 < low_watermark <= high_watermark")
        if self.selection not in ("best_fit", "shortest_remaining"):
            raise ValueError(f"selection must be best_fit or shortest_remaining, got {self.selection!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}")
        if self.max_per_round < 1:
            raise ValueError("max_per_round must be >= 1")

    def plan(self, replicas, slots, now):
        return self.balance(replicas, dict(slots))

    def balance(self, replicas: list[ReplicaLoad], slots: dict[str, int]) -> list[MigrationOrder]:
        loads = {replica.replica_id: replica for replica in replicas if replica.capacity_chunks > 0}
        orders: list[MigrationOrder] = []
        while len(orders) < self.max_per_round:
            ranked = sorted(loads.values(), key=lambda r: (r.load, r.replica_id))
            sources = [r for r in reversed(ranked) if r.load > self.high_watermark and slots.get(r.replica_id, 0)]
            targets = [r for r in ranked if r.load < self.low_watermark and slots.get(r.replica_id, 0)]
            choice = None
            for source in sources:
                for target in targets:
                    if target.replica_id != source.replica_id:
                        request = self._pick(source, target)
                        if request is not None:
                            choice = (source, target, request)
                            break
                if choice:
                    break
            if choice is None:
                break
            source, target, (request, placement) = choice
            orders.append(MigrationOrder(request.request_id, source.replica_id, target.replica_id, self.mode))
            loads[source.replica_id] = source.moved(request, incoming=False)
            loads[target.replica_id] = placement.load
            slots[source.replica_id] -= 1
            slots[target.replica_id] -= 1
        return orders

    def _pick(self, source: ReplicaLoad, target: ReplicaLoad) -> tuple[RequestLoad, Placement] | None:
        gap = source.load - target.load
        # chunks that would make the two loads equal: (S - c) / Cs == (T + c) / Ct
        ideal = (source.demand_chunks * target.capacity_chunks - target.demand_chunks * source.capacity_chunks) / (
            source.capacity_chunks + target.capacity_chunks)
        if self.selection == "best_fit":
            key = lambda r: (abs(r.kv_chunks - ideal), r.request_id)
        else:
            key = lambda r: (r.num_remaining, r.kv_chunks, r.request_id)
        for request in sorted((r for r in source.requests if r.is_migratable), key=key):
            placement = target.place(request, self.high_watermark)
            if placement is None:
                continue
            after_source = (source.demand_chunks - request.kv_chunks) / source.capacity_chunks
            if abs(after_source - placement.load.load) < gap:
                return request, placement
        return None


@dataclass
class BalanceAndPackPolicy(BalancePolicy):
    pack_watermark: float = 0.6
    pack_budget: int = 4
    pack_interval_s: float = 10.0
    drain: str = "least_loaded"  # or "newest": the replica Ray Serve's downscaling stops first
    name = "balance+pack"
    _draining: str | None = field(default=None, repr=False)
    _pack_times: deque = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.pack_watermark <= 1:
            raise ValueError("pack_watermark must be in (0, 1]")
        if self.pack_budget < 0 or self.pack_interval_s <= 0:
            raise ValueError("pack_budget must be >= 0 and pack_interval_s > 0")
        if self.drain not in ("least_loaded", "newest"):
            raise ValueError(f"drain must be 'least_loaded' or 'newest', got {self.drain!r}")

    def plan(self, replicas, slots, now):
        slots = dict(slots)
        orders = self.balance(replicas, slots)
        self._draining = self._drain_candidate(replicas)
        if orders or self._draining is None:
            return orders
        while self._pack_times and now - self._pack_times[0] >= self.pack_interval_s:
            self._pack_times.popleft()
        budget = self.pack_budget - len(self._pack_times)
        loads = {replica.replica_id: replica for replica in replicas}
        drained = loads[self._draining]
        for request in sorted((r for r in drained.requests if r.is_migratable),
                              key=lambda r: (-r.kv_chunks, r.request_id)):
            if budget <= 0 or slots.get(drained.replica_id, 0) <= 0:
                break
            fitting = [(r, placement) for r in loads.values() if r.replica_id != drained.replica_id
                       and slots.get(r.replica_id, 0) and (placement := r.place(request, self.pack_watermark))]
            if not fitting:
                continue
            # best fit: the fullest replica that takes it whole, else the fullest that takes it with host layers
            target, placement = max(fitting, key=lambda f: (f[1].num_host_layers == 0, f[0].load, f[0].replica_id))
            orders.append(MigrationOrder(request.request_id, drained.replica_id, target.replica_id, self.mode,
                                         reason="pack"))
            loads[target.replica_id] = placement.load
            slots[drained.replica_id] -= 1
            slots[target.replica_id] -= 1
            self._pack_times.append(now)
            budget -= 1
        return orders

    def _drain_candidate(self, replicas: list[ReplicaLoad]) -> str | None:
        """The replica to drain: the one being drained while it still qualifies (switching would undo
        moves), else the least loaded (`drain: newest`: the newest, the one Serve's downscaling stops); it
        qualifies if the others hold everything at most `pack_watermark` full."""
        usable = {r.replica_id: r for r in replicas if r.capacity_chunks > 0}
        if len(usable) < 2:
            return None
        total = sum(r.demand_chunks for r in usable.values())
        if self.drain == "newest":
            candidates = sorted(usable.values(), key=lambda r: (-r.started_at, r.replica_id))[:1]
        else:
            candidates = sorted(usable.values(), key=lambda r: (r.load, r.replica_id))[:1]
        if self._draining in usable and self._draining != candidates[0].replica_id:
            candidates.insert(0, usable[self._draining])
        for candidate in candidates:
            rest = sum(r.capacity_chunks for r in usable.values() if r is not candidate)
            if total <= self.pack_watermark * rest:
                return candidate.replica_id
        return None

    def scale_down_candidates(self) -> list[str]:
        return [self._draining] if self._draining else []


MIGRATION_POLICIES: dict[str, type[MigrationPolicy]] = {
    NoMigration.name: NoMigration, BalancePolicy.name: BalancePolicy, BalanceAndPackPolicy.name: BalanceAndPackPolicy,
}


def create_migration_policy(name: str, options: dict[str, Any] | None = None) -> MigrationPolicy:
    try:
        policy_cls = MIGRATION_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown migration policy {name!r}; known: {sorted(MIGRATION_POLICIES)}") from None
    try:
        return policy_cls(**(options or {}))
    except TypeError as exc:
        raise ValueError(f"migration policy {name!r}: bad options {sorted(options or {})}: {exc}") from None
