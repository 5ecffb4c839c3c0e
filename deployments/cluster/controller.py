"""The cluster controller: one named, detached Ray actor that every replica reports to.

Each replica pushes its pool telemetry, engine stats and migration detail (its requests with their KV
size, what its waiting requests need, the migrations it runs, its migration counters) every ≤ 0.5 s; the
controller keeps the latest report per replica, marks reports older than `stale_after_s` as stale (left
out of the totals and of planning) and forgets replicas silent for `expire_after_s`. Migration planning is
a policy chosen by name (deployments/migration/policy.py: `none`, `balance`, `balance+pack`) wrapped in a
`MigrationPlanner` (deployments/migration/planner.py); the orders go back to each source replica in the
reply to its report, with whether it is being drained. When every replica has deregistered (the
application was deleted) and none comes back within `idle_exit_s`, the actor ends itself:
`serve.shutdown()` does not stop detached actors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from deployments.cluster.placement import controller_scheduling_strategy
from deployments.migration.planner import MigrationPlanner
from deployments.migration.policy import (  # noqa: F401 - re-exported: the registry's historical home
    MIGRATION_POLICIES,
    MigrationPolicy,
    NoMigration,
    ReplicaLoad,
    create_migration_policy,
)

logger = logging.getLogger(__name__)

STAT_TOTALS = ("num_running", "num_waiting", "num_swapped", "kv_chunks_used", "kv_chunks_free")
MIGRATION_TOTALS = ("started", "committed", "aborted", "copy", "recompute", "bytes_moved", "adopted",
                    "downtime_sum_s", "downtime_count")


@dataclass(frozen=True)
class _Report:
    received_at: float
    telemetry: list[dict[str, Any]]
    stats: dict[str, Any]
    detail: dict[str, Any] = field(default_factory=dict)  # migration planning input (see MigrationManager)


class ClusterState:
    """The latest report of every replica and the view derived from it (no Ray, so it unit-tests)."""

    def __init__(self, stale_after_s: float = 2.0, expire_after_s: float = 10.0,
                 clock: Callable[[], float] = time.time):
        self.stale_after_s = stale_after_s
        self.expire_after_s = expire_after_s
        self._clock = clock
        self._reports: dict[str, _Report] = {}

    def report(self, replica_id: str, telemetry: list[dict[str, Any]], stats: dict[str, Any],
               detail: dict[str, Any] | None = None) -> None:
        self._reports[replica_id] = _Report(self._clock(), telemetry, stats, detail or {})

    def loads(self) -> dict[str, ReplicaLoad]:
        """What migration policies plan with: the fresh replicas that sent migration detail."""
        now = self._clock()
        return {replica_id: ReplicaLoad.from_dict(replica_id, report.detail)
                for replica_id, report in sorted(self._reports.items())
                if now - report.received_at <= self.stale_after_s and "capacity_chunks" in report.detail}

    def remove(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)

    @property
    def num_replicas(self) -> int:
        return len(self._reports)

    def expire(self) -> list[str]:
        now = self._clock()
        expired = [rid for rid, report in self._reports.items() if now - report.received_at > self.expire_after_s]
        for replica_id in expired:
            del self._reports[replica_id]
        return expired

    def view(self, policy: MigrationPolicy, planner: MigrationPlanner | None = None) -> dict[str, Any]:
        self.expire()
        now = self._clock()
        replicas = {}
        totals = dict.fromkeys(STAT_TOTALS, 0)
        migration_totals: dict[str, float] = dict.fromkeys(MIGRATION_TOTALS, 0)
        for replica_id, report in sorted(self._reports.items()):
            age_s = now - report.received_at
            is_stale = age_s > self.stale_after_s
            entry = {"age_s": round(age_s, 3), "is_stale": is_stale, "stats": report.stats,
                     "pools": report.telemetry}
            if "capacity_chunks" in report.detail:
                detail = report.detail
                entry["kv_load"] = round(ReplicaLoad.from_dict(replica_id, detail).load, 4)
                entry.update({key: detail.get(key) for key in ("requests", "migrating", "migration", "started_at")})
            replicas[replica_id] = entry
            for name in MIGRATION_TOTALS:  # cumulative counters: stale replicas count too
                migration_totals[name] += (report.detail.get("migration") or {}).get(name, 0)
            if not is_stale:
                for name in STAT_TOTALS:
                    totals[name] += report.stats.get(name, 0)
        kv_chunks = totals["kv_chunks_used"] + totals["kv_chunks_free"]
        totals["kv_usage"] = totals["kv_chunks_used"] / kv_chunks if kv_chunks else 0.0
        count = migration_totals["downtime_count"]
        migration_totals["mean_downtime_s"] = round(migration_totals["downtime_sum_s"] / count, 4) if count else None
        planned = planner.view() if planner is not None else {"in_flight": [], "scale_down_candidates": []}
        return {"timestamp": now, "migration_policy": policy.name, "num_replicas": len(replicas),
                "replicas": replicas, "totals": totals, "migrations": planned["in_flight"],
                "migration_totals": migration_totals, "scale_down_candidates": planned["scale_down_candidates"]}


class ClusterController:
    """The actor (created through `get_or_create_controller`)."""

    def __init__(self, migration_policy: str = "none", stale_after_s: float = 2.0,
                 expire_after_s: float = 10.0, idle_exit_s: float = 30.0,
                 migration_policy_options: dict[str, Any] | None = None, max_concurrent_migrations: int = 2,
                 plan_interval_s: float = 1.0, migration_cooldown_s: float = 10.0):
        self._state = ClusterState(stale_after_s, expire_after_s)
        self._planner = MigrationPlanner(create_migration_policy(migration_policy, migration_policy_options),
                                         max_concurrent=max_concurrent_migrations, plan_interval_s=plan_interval_s,
                                         cooldown_s=migration_cooldown_s)
        self._idle_exit_s = idle_exit_s
        self._has_had_replicas = False
        self._idle_since: float | None = None
        self._watchdog: asyncio.Task | None = None
        self._shutdown_at: float | None = None  # time.time() by which replicas must have drained

    async def begin_shutdown(self, timeout_s: float) -> float:
        """Orders every replica (in the reply to its next report) to drain by now + timeout_s."""
        if self._shutdown_at is None:
            self._shutdown_at = time.time() + timeout_s
        return self._shutdown_at

    async def report(self, replica_id: str, telemetry: list[dict[str, Any]], stats: dict[str, Any],
                     detail: dict[str, Any] | None = None) -> dict[str, Any]:
        """Stores the report; answers with the migrations this replica should start and whether the packing
        policy is draining it."""
        self._state.report(replica_id, telemetry, stats, detail)
        self._has_had_replicas = True
        self._idle_since = None
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_idle())
        if detail is None:
            return {"orders": [], "is_draining": False, "shutdown_at": self._shutdown_at}
        self._planner.observe(replica_id, detail.get("migrating", []))
        try:
            self._planner.plan(self._state.loads())
        except Exception:  # a policy bug must not stop telemetry
            logger.exception("migration planning failed")
        return {"orders": self._planner.take_orders(replica_id),
                "is_draining": replica_id in self._planner.policy.scale_down_candidates(),
                "shutdown_at": self._shutdown_at}

    async def deregister(self, replica_id: str) -> None:
        self._state.remove(replica_id)
        self._planner.forget_replica(replica_id)
        if self._state.num_replicas == 0:
            self._idle_since = time.monotonic()

    async def cluster_view(self) -> dict[str, Any]:
        return self._state.view(self._planner.policy, self._planner)

    async def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict[str, Any]:
        """Migrates a request (engine id, or an HTTP response id: all its choices) now, whatever the policy;
        the order reaches its replica with that replica's next report."""
        return self._planner.force(request_id, target, mode, self._state.loads())

    async def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str:
        self._planner.policy = create_migration_policy(name, options)
        return self._planner.policy.name

    async def ping(self) -> str:
        return "ok"

    async def _exit_when_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._idle_exit_s / 4))
            self._state.expire()
            if self._state.num_replicas == 0 and self._idle_since is None:
                self._idle_since = time.monotonic()
            if self._idle_since is not None and time.monotonic() - self._idle_since > self._idle_exit_s:
                logger.info("no replica for %.0f s: the cluster controller exits", self._idle_exit_s)
                ray.kill(ray.get_runtime_context().current_actor, no_restart=True)
                return


def get_or_create_controller(name: str, namespace: str, migration_policy: str = "none",
                             **options: Any) -> ray.actor.ActorHandle:
    # num_cpus=0: placement groups may hold every CPU. An explicit strategy: created from a replica, the actor
    # would otherwise land in (and die with) the replica's placement group. Named and detached: every node
    # finds it; it prefers the head node, so losing a worker node keeps the cluster view.
    return ray.remote(ClusterController).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        scheduling_strategy=controller_scheduling_strategy(),
    ).remote(migration_policy=migration_policy, **options)


def controller_options(args: Any) -> dict[str, Any]:
    """The ClusterController arguments that come from AppArgs."""
    return {"migration_policy_options": dict(args.migration_policy_options),
            "max_concurrent_migrations": args.migration.max_concurrent}


def stop_controller(name: str, namespace: str) -> bool:
    try:
        handle = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(handle, no_restart=True)
    return True


class ControllerClient:
    """A replica's link to the controller; looks it up again after the controller restarts."""

    def __init__(self, replica_id: str, name: str, namespace: str, migration_policy: str = "none",
                 timeout_s: float = 2.0, options: dict[str, Any] | None = None):
        self.replica_id = replica_id
        self._name = name
        self._namespace = namespace
        self._migration_policy = migration_policy
        self._options = options or {}
        self._timeout_s = timeout_s
        self._handle: ray.actor.ActorHandle | None = None

    def _controller(self) -> ray.actor.ActorHandle:
        if self._handle is None:
            self._handle = get_or_create_controller(self._name, self._namespace, self._migration_policy,
                                                    **self._options)
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self._controller(), method).remote(*args)
            return await asyncio.wait_for(ref, self._timeout_s)
        except ray.exceptions.RayTaskError as exc:
            # The controller raised: pass on its own error, not Ray's remote traceback (ANSI codes, pids,
            # paths), which callers would otherwise show to HTTP clients.
            cause = exc.cause
            if isinstance(cause, ValueError):
                raise ValueError(str(cause)) from None
            raise RuntimeError(f"the cluster controller's {method} failed with {type(cause).__name__}") from exc
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ValueError):
            self._handle = None  # dead or restarting: look it up (or start it) again next time
            raise

    async def report(self, telemetry: list[dict[str, Any]], stats: dict[str, Any],
                     detail: dict[str, Any] | None = None) -> dict[str, Any]:
        return await self._call("report", self.replica_id, telemetry, stats, detail)

    async def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict:
        return await self._call("force_migration", request_id, target, mode)

    async def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str:
        return await self._call("set_migration_policy", name, options)

    async def deregister(self) -> None:
        await self._call("deregister", self.replica_id)

    async def cluster_view(self) -> dict[str, Any]:
        return await self._call("cluster_view")
