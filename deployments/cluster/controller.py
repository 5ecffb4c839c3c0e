"""The cluster controller: one named, detached Ray actor that every replica reports to.

Each replica pushes a `ReplicaReport` (deployments/telemetry.py: pool telemetry, engine stats and,
when it can migrate, its `ReplicaLoad`, the migrations it runs and its migration counters) every
≤ 0.5 s. What the controller keeps and decides is `ClusterCore` (deployments/cluster/state.py, no Ray,
also run by the simulator): the latest report per replica, and migration planning by a policy chosen
by name (deployments/migration/policy.py: `none`, `balance`, `balance+pack`) in a `MigrationPlanner`;
the orders go back to each source replica in the `ControllerReply`, with whether it is being drained.
With `parameter_dropping.enabled`, KunServe's drop plan runs on every report too (drop_coordinator.py)
and its `LayerOrder`s ride in the same reply, or sooner in the answer to a replica's long poll
(`wait_layer_orders`): the other replica of a new pair hears its order when the plan makes it.
When every replica has deregistered (the application was deleted) and none comes back within
`idle_exit_s`, the actor ends itself: `serve.shutdown()` does not stop detached actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

import ray

from deployments.cluster.drop_plan import DroppingConfig
from deployments.cluster.placement import controller_scheduling_strategy
from deployments.cluster.priority import take_priority
from deployments.cluster.state import ClusterCore, ClusterState  # noqa: F401 - ClusterState re-exported
from deployments.migration.policy import (  # noqa: F401 - re-exported: the registry's historical home
    MIGRATION_POLICIES,
    MigrationPolicy,
    NoMigration,
    create_migration_policy,
)
from deployments.telemetry import ControllerReply, ReplicaReport

if TYPE_CHECKING:
    from deployments.args import AppArgs

logger = logging.getLogger(__name__)
# The engine loops' default (EngineConfig.engine_thread_nice). The controller works a few milliseconds per
# report, but at Ray's worker nice of 15 it waits behind the replicas' compute threads whenever they fill the
# cores: measured through Serve, a spike's drop order came 1.1-1.3 s after the replica's report went out.
CONTROLLER_NICE = -10


class ClusterController:
    """The actor (created through `get_or_create_controller`)."""

    def __init__(self, migration_policy: str = "none", stale_after_s: float = 2.0,
                 expire_after_s: float = 10.0, idle_exit_s: float = 30.0,
                 migration_policy_options: dict[str, Any] | None = None, max_concurrent_migrations: int = 2,
                 plan_interval_s: float = 1.0, migration_cooldown_s: float = 10.0,
                 parameter_dropping: dict[str, Any] | None = None):
        if take_priority(CONTROLLER_NICE) == 0:
            logger.warning("the cluster controller stays at nice %d (nice %d refused)",
                           os.getpriority(os.PRIO_PROCESS, 0), CONTROLLER_NICE)
        dropping = DroppingConfig(**parameter_dropping) if parameter_dropping else None
        self._core = ClusterCore(migration_policy, stale_after_s, expire_after_s, migration_policy_options,
                                 max_concurrent_migrations, plan_interval_s, migration_cooldown_s, dropping=dropping)
        self._idle_exit_s = idle_exit_s
        self._has_had_replicas = False
        self._idle_since: float | None = None
        self._watchdog: asyncio.Task | None = None
        self._shutdown_at: float | None = None  # time.time() by which replicas must have drained
        self._order_waiters: dict[str, asyncio.Event] = {}  # replica -> set when layer orders wait for it

    async def begin_shutdown(self, timeout_s: float) -> float:
        """Orders every replica (in the reply to its next report) to drain by now + timeout_s."""
        if self._shutdown_at is None:
            self._shutdown_at = time.time() + timeout_s
        return self._shutdown_at

    async def report(self, replica_id: str, report: ReplicaReport) -> ControllerReply:
        """Stores the report; answers with the migrations this replica should start and whether the packing
        policy is draining it."""
        self._has_had_replicas = True
        self._idle_since = None
        if self._watchdog is None:
            self._watchdog = asyncio.get_running_loop().create_task(self._exit_when_idle())
        reply = self._core.report(replica_id, report)
        for waiting in self._core.with_layer_orders():  # e.g. the other replica of a pair this report formed
            if waiting in self._order_waiters:
                self._order_waiters[waiting].set()
        if self._shutdown_at is None:
            return reply
        return dataclasses.replace(reply, shutdown_at=self._shutdown_at)

    async def wait_layer_orders(self, replica_id: str, timeout_s: float) -> tuple:
        """A long poll: the replica's layer orders as soon as the drop plan queues any, else () after
        `timeout_s`. A drop's other replica hears it now, not with its next report (up to a telemetry period and
        a step later: measured 0.5 s under a spike); the reports' replies still carry orders too."""
        waiter = self._order_waiters.setdefault(replica_id, asyncio.Event())
        orders = self._core.take_layer_orders(replica_id)
        if orders:
            return orders
        waiter.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(waiter.wait(), timeout_s)
        return self._core.take_layer_orders(replica_id)

    async def deregister(self, replica_id: str) -> None:
        waiter = self._order_waiters.pop(replica_id, None)
        if waiter is not None:
            waiter.set()
        self._core.deregister(replica_id)
        if self._core.state.num_replicas == 0:
            self._idle_since = time.monotonic()

    async def cluster_view(self) -> dict[str, Any]:
        return self._core.view()

    async def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict[str, Any]:
        """Migrates a request (engine id, or an HTTP response id: all its choices) now, whatever the policy;
        the order reaches its replica with that replica's next report."""
        return self._core.force_migration(request_id, target, mode)

    async def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str:
        return self._core.set_migration_policy(name, options)

    async def ping(self) -> str:
        return "ok"

    async def _exit_when_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self._idle_exit_s / 4))
            self._core.state.expire()
            if self._core.state.num_replicas == 0 and self._idle_since is None:
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


def controller_options(args: AppArgs) -> dict[str, Any]:
    """The ClusterController arguments that come from AppArgs."""
    return {"migration_policy_options": dict(args.migration_policy_options),
            "max_concurrent_migrations": args.migration.max_concurrent,
            "parameter_dropping": args.parameter_dropping.plan_options()}


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

    async def _call(self, method: str, *args: Any, wait_s: float = 0.0) -> Any:
        """`wait_s`: how long the controller may hold the call (a long poll), on top of the timeout."""
        try:
            ref = getattr(self._controller(), method).remote(*args)
            return await asyncio.wait_for(ref, self._timeout_s + wait_s)
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

    async def report(self, report: ReplicaReport) -> ControllerReply:
        return await self._call("report", self.replica_id, report)

    async def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict:
        return await self._call("force_migration", request_id, target, mode)

    async def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str:
        return await self._call("set_migration_policy", name, options)

    async def wait_layer_orders(self, wait_s: float) -> tuple:
        return await self._call("wait_layer_orders", self.replica_id, wait_s, wait_s=wait_s)

    async def deregister(self) -> None:
        await self._call("deregister", self.replica_id)

    async def cluster_view(self) -> dict[str, Any]:
        return await self._call("cluster_view")
