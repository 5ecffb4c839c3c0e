"""What the cluster controller knows and decides, without Ray: `ClusterState` and `ClusterCore`.

`ClusterState` keeps the latest `ReplicaReport` of every replica, marks reports older than `stale_after_s`
as stale (left out of the totals and of planning) and forgets replicas silent for `expire_after_s`.
`ClusterCore` is the controller's logic: a report in, a `ControllerReply` out (the migrations that replica
should start and whether the packing policy is draining it), with the migration policy (deployments/
migration/policy.py) wrapped in a `MigrationPlanner`. The Ray actor (controller.py) and the simulator
(loadtest/sim) both run this class, each with its own clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from deployments.cluster.drop_coordinator import DropCoordinator
from deployments.cluster.drop_plan import DroppingConfig
from deployments.migration.planner import MigrationPlanner
from deployments.migration.policy import MigrationPolicy, create_migration_policy
from deployments.telemetry import ControllerReply, ReplicaLoad, ReplicaReport

logger = logging.getLogger(__name__)

STAT_TOTALS = ("num_running", "num_waiting", "num_swapped", "kv_chunks_used", "kv_chunks_free")
MIGRATION_TOTALS = ("started", "committed", "aborted", "copy", "recompute", "bytes_moved", "adopted",
                    "downtime_sum_s", "downtime_count")


@dataclass(frozen=True)
class _Received:
    received_at: float
    report: ReplicaReport


class ClusterState:
    """The latest report of every replica and the view derived from it."""

    def __init__(self, stale_after_s: float = 2.0, expire_after_s: float = 10.0,
                 clock: Callable[[], float] = time.time):
        self.stale_after_s = stale_after_s
        self.expire_after_s = expire_after_s
        self._clock = clock
        self._reports: dict[str, _Received] = {}

    def report(self, replica_id: str, report: ReplicaReport) -> None:
        self._reports[replica_id] = _Received(self._clock(), report)

    def loads(self) -> dict[str, ReplicaLoad]:
        """What migration policies plan with: the fresh replicas that take part in migration."""
        now = self._clock()
        return {replica_id: received.report.load for replica_id, received in sorted(self._reports.items())
                if now - received.received_at <= self.stale_after_s and received.report.load is not None}

    def fresh_ids(self) -> set[str]:
        now = self._clock()
        return {rid for rid, received in self._reports.items() if now - received.received_at <= self.stale_after_s}

    def remove(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    @property
    def num_replicas(self) -> int:
        return len(self._reports)

    def expire(self) -> list[str]:
        now = self._clock()
        expired = [rid for rid, received in self._reports.items() if now - received.received_at > self.expire_after_s]
        for replica_id in expired:
            del self._reports[replica_id]
        return expired

    def view(self, policy: MigrationPolicy, planner: MigrationPlanner | None = None) -> dict[str, Any]:
        """The JSON of /v1/cluster."""
        self.expire()
        now = self._clock()
        replicas = {}
        totals: dict[str, float] = dict.fromkeys(STAT_TOTALS, 0)
        migration_totals: dict[str, float] = dict.fromkeys(MIGRATION_TOTALS, 0)
        for replica_id, received in sorted(self._reports.items()):
            report = received.report
            age_s = now - received.received_at
            is_stale = age_s > self.stale_after_s
            entry = {"age_s": round(age_s, 3), "is_stale": is_stale, "stats": asdict(report.stats),
                     "pools": list(report.pools)}
            if report.load is not None:
                entry.update({"kv_load": round(report.load.load, 4),
                              "requests": [asdict(request) for request in report.load.requests],
                              "migrating": list(report.migrating), "migration": dict(report.migration),
                              "started_at": report.load.started_at})
            replicas[replica_id] = entry
            for name in MIGRATION_TOTALS:  # cumulative counters: stale replicas count too
                migration_totals[name] += report.migration.get(name, 0)
            if not is_stale:
                for name in STAT_TOTALS:
                    totals[name] += getattr(report.stats, name)
        kv_chunks = totals["kv_chunks_used"] + totals["kv_chunks_free"]
        totals["kv_usage"] = totals["kv_chunks_used"] / kv_chunks if kv_chunks else 0.0
        count = migration_totals["downtime_count"]
        migration_totals["mean_downtime_s"] = round(migration_totals["downtime_sum_s"] / count, 4) if count else None
        planned = planner.view() if planner is not None else {"in_flight": [], "scale_down_candidates": []}
        return {"timestamp": now, "migration_policy": policy.name, "num_replicas": len(replicas),
                "replicas": replicas, "totals": totals, "migrations": planned["in_flight"],
                "migration_totals": migration_totals, "scale_down_candidates": planned["scale_down_candidates"]}


class ClusterCore:
    """The controller's decisions: reports in, replies out."""

    def __init__(self, migration_policy: str = "none", stale_after_s: float = 2.0, expire_after_s: float = 10.0,
                 migration_policy_options: dict[str, Any] | None = None, max_concurrent_migrations: int = 2,
                 plan_interval_s: float = 1.0, migration_cooldown_s: float = 10.0,
                 clock: Callable[[], float] = time.time, dropping: DroppingConfig | None = None):
        self.state = ClusterState(stale_after_s, expire_after_s, clock)
        # KunServe: None unless parameter_dropping is enabled
        self.dropping = DropCoordinator(dropping, clock) if dropping is not None and dropping.enabled else None
        self.planner = MigrationPlanner(create_migration_policy(migration_policy, migration_policy_options),
                                        max_concurrent=max_concurrent_migrations, plan_interval_s=plan_interval_s,
                                        cooldown_s=migration_cooldown_s, clock=clock)

    @property
    def policy(self) -> MigrationPolicy:
        return self.planner.policy

    def report(self, replica_id: str, report: ReplicaReport) -> ControllerReply:
        self.state.report(replica_id, report)
        layer_orders = self._plan_drops(replica_id, report)
        if report.load is None:
            return ControllerReply(layer_orders=layer_orders)
        self.planner.observe(replica_id, report.migrating)
        try:
            self.planner.plan(self.state.loads())
        except Exception:  # a policy bug must not stop telemetry
            logger.exception("migration planning failed")
        return ControllerReply(self.planner.take_orders(replica_id),
                               replica_id in self.planner.policy.scale_down_candidates(), layer_orders=layer_orders)

    def _plan_drops(self, replica_id: str, report: ReplicaReport) -> tuple:
        if self.dropping is None:
            return ()
        try:
            self.dropping.observe(replica_id, report)
            self.dropping.plan(self.state.fresh_ids())
        except Exception:  # a plan bug must not stop telemetry
            logger.exception("drop planning failed")
        return self.dropping.take_orders(replica_id)

    def take_layer_orders(self, replica_id: str) -> tuple:
        """The layer orders waiting for a replica (each is delivered once: here or in a report's reply)."""
        return self.dropping.take_orders(replica_id) if self.dropping is not None else ()

    def with_layer_orders(self) -> list[str]:
        return self.dropping.with_orders() if self.dropping is not None else []

    def deregister(self, replica_id: str) -> None:
        self.state.remove(replica_id)
        if self.dropping is not None:
            self.dropping.forget(replica_id)
        self.planner.forget_replica(replica_id)

    def view(self) -> dict[str, Any]:
        view = self.state.view(self.planner.policy, self.planner)
        if self.dropping is not None:
            view["parameter_dropping"] = self.dropping.view()
        return view

    def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict[str, Any]:
        return self.planner.force(request_id, target, mode, self.state.loads())

    def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str:
        self.planner.policy = create_migration_policy(name, options)
        return self.planner.policy.name
