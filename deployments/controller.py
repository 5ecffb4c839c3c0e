"""The cluster controller: one named, detached Ray actor that every replica reports to.

Each replica pushes its pool telemetry and engine stats every ≤ 0.5 s; the controller keeps the latest
report per replica, marks reports older than `stale_after_s` as stale (left out of the totals) and forgets
replicas silent for `expire_after_s`. Migration planning (which request moves where) is a policy chosen
by name from `MIGRATION_POLICIES`; only `none` exists so far. When every replica has deregistered (the
application was deleted) and none comes back within `idle_exit_s`, the actor ends itself: `serve.shutdown()`
does not stop detached actors.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

logger = logging.getLogger(__name__)

STAT_TOTALS = ("num_running", "num_waiting", "num_swapped", "kv_chunks_used", "kv_chunks_free")


class MigrationPolicy(ABC):
    name: str

    @abstractmethod
    def plan(self, view: dict[str, Any]) -> list[dict[str, Any]]:
        """Migrations to perform now: [{"request_id", "source", "target", "mode": "copy"|"recompute"}]."""


class NoMigration(MigrationPolicy):
    name = "none"

    def plan(self, view: dict[str, Any]) -> list[dict[str, Any]]:
        return []


MIGRATION_POLICIES: dict[str, type[MigrationPolicy]] = {NoMigration.name: NoMigration}


def create_migration_policy(name: str) -> MigrationPolicy:
    try:
        return MIGRATION_POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown migration policy {name!r}; known: {sorted(MIGRATION_POLICIES)}") from None


@dataclass(frozen=True)
class _Report:
    received_at: float
    telemetry: list[dict[str, Any]]
    stats: dict[str, Any]


class ClusterState:
    """The latest report of every replica and the view derived from it (no Ray, so it unit-tests)."""

    def __init__(self, stale_after_s: float = 2.0, expire_after_s: float = 10.0,
                 clock: Callable[[], float] = time.time):
        self.stale_after_s = stale_after_s
        self.expire_after_s = expire_after_s
        self._clock = clock
        self._reports: dict[str, _Report] = {}

    def report(self, replica_id: str, telemetry: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        self._reports[replica_id] = _Report(self._clock(), telemetry, stats)

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

    def view(self, policy: MigrationPolicy) -> dict[str, Any]:
        self.expire()
        now = self._clock()
        replicas = {}
        totals = dict.fromkeys(STAT_TOTALS, 0)
        for replica_id, report in sorted(self._reports.items()):
            age_s = now - report.received_at
            is_stale = age_s > self.stale_after_s
            replicas[replica_id] = {"age_s": round(age_s, 3), "is_stale": is_stale, "stats": report.stats,
                                    "pools": report.telemetry}
            if not is_stale:
                for name in STAT_TOTALS:
                    totals[name] += report.stats.get(name, 0)
        kv_chunks = totals["kv_chunks_used"] + totals["kv_chunks_free"]
        totals["kv_usage"] = totals["kv_chunks_used"] / kv_chunks if kv_chunks else 0.0
        view = {"timestamp": now, "migration_policy": policy.name, "num_replicas": len(replicas),
                "replicas": replicas, "totals": totals}
        view["migrations"] = policy.plan(view)
        return view


class ClusterController:
    """The actor (created through `get_or_create_controller`)."""

    def __init__(self, migration_policy: str = "none", stale_after_s: float = 2.0,
                 expire_after_s: float = 10.0, idle_exit_s: float = 30.0):
        self._state = ClusterState(stale_after_s, expire_after_s)
        self._policy = create_migration_policy(migration_policy)
        self._idle_exit_s = idle_exit_s
        self._has_had_replicas = False
        self._idle_since: float | None = None
        self._watchdog: asyncio.Task | None = None

    async def report(self, replica_id: str, telemetry: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        self._state.report(replica_id, telemetry, stats)
        self._has_had_replicas = True
        self._idle_since = None
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_idle())

    async def deregister(self, replica_id: str) -> None:
        self._state.remove(replica_id)
        if self._state.num_replicas == 0:
            self._idle_since = time.monotonic()

    async def cluster_view(self) -> dict[str, Any]:
        return self._state.view(self._policy)

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
    # num_cpus=0: placement groups may hold every CPU. scheduling_strategy="DEFAULT": created from a replica,
    # the actor would otherwise land in (and die with) the replica's placement group.
    return ray.remote(ClusterController).options(
        name=name, namespace=namespace, lifetime="detached", get_if_exists=True, num_cpus=0,
        scheduling_strategy="DEFAULT",
    ).remote(migration_policy=migration_policy, **options)


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
                 timeout_s: float = 2.0):
        self.replica_id = replica_id
        self._name = name
        self._namespace = namespace
        self._migration_policy = migration_policy
        self._timeout_s = timeout_s
        self._handle: ray.actor.ActorHandle | None = None

    def _controller(self) -> ray.actor.ActorHandle:
        if self._handle is None:
            self._handle = get_or_create_controller(self._name, self._namespace, self._migration_policy)
        return self._handle

    async def _call(self, method: str, *args: Any) -> Any:
        try:
            ref = getattr(self._controller(), method).remote(*args)
            return await asyncio.wait_for(ref, self._timeout_s)
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, ValueError):
            self._handle = None  # dead or restarting: look it up (or start it) again next time
            raise

    async def report(self, telemetry: list[dict[str, Any]], stats: dict[str, Any]) -> None:
        await self._call("report", self.replica_id, telemetry, stats)

    async def deregister(self) -> None:
        await self._call("deregister", self.replica_id)

    async def cluster_view(self) -> dict[str, Any]:
        return await self._call("cluster_view")
