"""`LLMServer`: one Ray Serve replica = one engine (plus its TP worker actors) behind the OpenAI app.

The replica builds its engine in a worker thread (the model load takes seconds), then serves the FastAPI
app from `build_openai_app`, publishes routing stats for `KVHeadroomRouter`, and pushes its telemetry to
the cluster controller every `telemetry_period_s` (and at once when, with parameter dropping, a request lifts
its clients' peak KV demand past `high_watermark`; a long poll beside it brings KunServe's layer orders as soon
as the controller makes them); the reply carries the migrations this replica should
start (deployments/migration/source.py). The `migration_*` methods are the destination side of a migration, called
by other replicas through a handle that targets this replica (deployments/migration/transport.py).
Drain (`drain(deadline)`: ordered by the controller's reply when `python -m deployments.launch` stops, and
run again from `__del__`): new generation requests get 503 `shutting_down` with Retry-After, running
ones may finish until shortly before the deadline, then the rest are aborted, so each client gets a 503
`aborted` or, in a stream, an error event and `[DONE]`. Shutdown: drain, stop the telemetry task and the
migrations, deregister, shut the engine down (which stops the TP ranks), then kill the TP actors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ray import serve
from ray.serve.config import RequestRouterConfig

from deployments.args import AppArgs, resolve_device
from deployments.cluster.autoscaling import autoscaling_metrics
from deployments.cluster.controller import ControllerClient, controller_options
from deployments.cluster.placement import local_node, tensor_parallel_interface
from deployments.cluster.priority import PROXY_TITLE, lift_processes
from deployments.cluster.tensor_parallel import EXECUTOR_PATH, WorkerLauncher, import_attr
from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.openai_app import AppSettings, build_openai_app
from deployments.migration.relay import RelayRegistry
from deployments.telemetry import ControllerReply, LayerOrder, ReplicaLoad, ReplicaReport, ReplicaStats, RoutingStats
from engine.api import EngineClient, EngineDeadError

# Torch and the engine (migration, cooperation) are imported where the replica first needs them, not here:
# `serve run` imports this module in its application-build task, which then took 7 s of a 2-core box's CPU
# before the replica could start (docs/SPEED.md, 2026-12-07 (night)).
if TYPE_CHECKING:
    from ray.serve.context import ReplicaContext

    from deployments.cluster.cooperation import Cooperation
    from deployments.migration.endpoint import AdoptStream, MigrationEndpoint
    from deployments.migration.kv_channel import ChannelAddress, StageHeader
    from deployments.migration.source import MigrationManager
    from engine.migration import KVStage, RequestSnapshot

logger = logging.getLogger("ray.serve")
DRAIN_MARGIN_S = 2.0  # before the shutdown deadline: abort what still runs, so its clients hear an ending
LAYER_ORDERS_POLL_S = 10.0  # how long the controller holds a replica's long poll for KunServe's layer orders


@dataclass
class BuiltEngine:
    engine: EngineClient
    bindings: EngineBindings | None = None  # None: the engine package's
    cleanup: Callable[[], None] | None = None  # runs after engine.shutdown()
    failed_ranks: Callable[[], list[int]] | None = None


def build_elastic_engine(args: AppArgs) -> BuiltEngine:
    from engine.async_engine import AsyncEngine

    device = resolve_device(args.device)
    if args.models is not None:  # several models, one pool (engine/core/engine_group.py)
        from engine.core.engine_group import EngineGroup

        return BuiltEngine(AsyncEngine(EngineGroup(args.to_engine_configs(device=device))))
    config = args.to_engine_config(device=device)
    if args.tensor_parallel_size == 1:
        return BuiltEngine(AsyncEngine.from_config(config))
    # The ranks share a node (STRICT_PACK placement group): their group stays on the loopback interface.
    config = dataclasses.replace(config, process_group_interface=tensor_parallel_interface())
    launcher = WorkerLauncher(args.tensor_parallel_size, config, args.cpus_per_rank,
                              gpus_per_rank=1 if device == "cuda" else 0)
    launcher.start()
    try:
        executor = import_attr(EXECUTOR_PATH)(config, launcher.init_method_file)
        engine = AsyncEngine.from_config(config, executor=executor)
    except BaseException:
        launcher.shutdown(timeout_s=0)
        raise
    return BuiltEngine(engine, cleanup=launcher.shutdown, failed_ranks=launcher.failed_ranks)


def build_engine(args: AppArgs) -> BuiltEngine:
    if args.engine_factory is None:
        return build_elastic_engine(args)
    if ":" not in args.engine_factory:
        raise ValueError(f"engine_factory must be 'module:callable', got {args.engine_factory!r}")
    made = import_attr(args.engine_factory)(args, **args.engine_factory_kwargs)
    return made if isinstance(made, BuiltEngine) else BuiltEngine(made)


def set_torch_threads(num_threads: int) -> None:
    import torch

    torch.set_num_threads(num_threads)


# The router is part of the design, so it is the default however the app is deployed (YAML may override).
ROUTER_CONFIG = RequestRouterConfig(request_router_class="deployments.cluster.router:KVHeadroomRouter",
                                    request_routing_stats_period_s=0.5)


# max_ongoing_requests >= the engine's max_num_seqs + max_num_waiting (64 + 256 by default): load is shed by
# the engine's queue limit (an OpenAI-shaped 503 with Retry-After), not by requests piling up in the proxy.
@serve.deployment(ray_actor_options={"num_cpus": 1}, max_ongoing_requests=320, health_check_period_s=5,
                  graceful_shutdown_timeout_s=20, request_router_config=ROUTER_CONFIG)
@serve.ingress()
class LLMServer:
    async def __init__(self, args: dict[str, Any]):
        self.args = AppArgs.model_validate(args)
        context = serve.get_replica_context()
        self.replica_id = context.replica_tag
        self._started_at = time.time()  # the packing policy's `drain: newest` and the autoscaler compare these
        set_torch_threads(self.args.threads_per_rank())
        started = time.monotonic()
        what = self.args.engine_factory or self.args.model or self.args.models or "the embedded SmolLM2"
        logger.info("replica %s: loading %s (%d torch threads)...", self.replica_id, what,
                    self.args.threads_per_rank())
        self._built = await asyncio.to_thread(build_engine, self.args)
        self.engine = self._built.engine
        await self.engine.start()
        # this replica's request handlers and routing stats run on this thread: at the engine loop's priority,
        # or its compute threads would starve them (EngineConfig.engine_thread_nice)
        from engine.async_engine import AsyncEngine, set_thread_nice

        if isinstance(self.engine, AsyncEngine):  # (a test's fake engine has no loop thread)
            nice = self.engine.config.engine_thread_nice
            if set_thread_nice(nice) and nice is not None:
                # and the loop's default executor (asyncio.to_thread: opening a KunServe pair's or a migration's
                # group): its first thread was started at Ray's nice while the engine was built, and under a
                # burst a pair's group waited 0.5 s on it (docs/KUNSERVE.md)
                asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(
                    thread_name_prefix="replica", initializer=set_thread_nice, initargs=(nice,)))
            # this node's HTTP proxy too: at Ray's 15 it waited for the compute threads (measured at 32 users:
            # TTFT p99 11-16% lower and 5-10% more output with the proxy at the engine's nice; docs/SPEED.md)
            lifted = lift_processes(PROXY_TITLE, nice) if nice is not None else 0
            logger.info("replica %s: engine loop at nice %s; this node's Serve proxy lifted to it (%d threads)",
                        self.replica_id, nice, lifted)
        logger.info("replica %s: %s ready in %.1f s", self.replica_id, self.engine.model_name,
                    time.monotonic() - started)
        from deployments.migration.source import MigrationStats

        self._relays = RelayRegistry()
        self._migration_stats = MigrationStats()
        self._is_draining = False
        self._last_load: ReplicaLoad | None = None
        self._load_task: asyncio.Future[ReplicaLoad] | None = None  # the engine thread's answer, pending
        self._migrations: MigrationManager | None = None
        self._endpoint: MigrationEndpoint | None = None
        if self.engine.supports_migration:
            self._start_migration(context)
        self._cooperation: Cooperation | None = None
        dropping = self.args.parameter_dropping.enabled
        if dropping and self.engine.supports_migration and hasattr(self.engine, "cooperate"):
            from deployments.cluster.cooperation import Cooperation

            self._cooperation = Cooperation(self.replica_id, self.engine, local_node(self.args.network_interface),
                                            timeout_s=max(30.0, self.args.migration.to_config().call_timeout_s),
                                            hang_after_s=self.args.parameter_dropping.peer_hang_s)
        # KunServe: an arrival that lifts the clients' peak KV demand past high_watermark reports at once
        self._report_now = asyncio.Event()
        self._reported_peak = 0
        if self._cooperation is not None:
            self.engine.add_arrival_listener(self._on_arrival)
        self._controller = ControllerClient(self.replica_id, self.args.controller_name,
                                            self.args.controller_namespace, self.args.migration_policy,
                                            options=controller_options(self.args))
        self._telemetry_task = asyncio.get_running_loop().create_task(self._push_telemetry())
        self._orders_task = (asyncio.get_running_loop().create_task(self._receive_layer_orders())
                             if self._cooperation is not None else None)

    def _start_migration(self, context: ReplicaContext) -> None:
        from deployments.migration.endpoint import MigrationEndpoint
        from deployments.migration.kv_channel import KVChannels
        from deployments.migration.source import MigrationManager
        from deployments.migration.transport import make_peer

        config = self.args.migration.to_config()
        device = resolve_device(self.args.device)
        node = local_node(self.args.network_interface)  # groups with other nodes bind to its address
        self._channels = KVChannels(node.host, device, timeout_s=config.call_timeout_s, node_id=node.node_id,
                                    interface=node.interface)
        peer = make_peer(self.args.migration.resolved_transport(), context.deployment, context.app_name,
                         self.replica_id, self._channels)
        self._endpoint = MigrationEndpoint(self.engine, config, self._migration_stats, self._relays, self._channels)
        self._migrations = MigrationManager(self.engine, peer, self._relays, config, self._migration_stats)
        logger.info("replica %s: migrations move KV through %s", self.replica_id, peer.name)

    def _on_arrival(self) -> None:
        """A request arrived: if its replica's clients' peak KV demand is now past `high_watermark` of its
        capacity and above what the last report said, the telemetry loop reports now, not at its next period
        (a spike's first requests would otherwise wait up to a period and a step for the drop plan to hear)."""
        peak = self._cooperation.client_peak_chunks()
        if peak > self._reported_peak and peak >= self.args.parameter_dropping.high_watermark * \
                self._cooperation.kv_capacity_chunks():
            self._report_now.set()

    def __serve_build_asgi_app__(self):
        settings = AppSettings(served_model_name=self.args.served_model_name, api_key=self.args.api_key,
                               replica_id=self.replica_id, bindings=self._built.bindings,
                               cluster_view=self._controller.cluster_view,
                               default_sampling=self.args.default_sampling, relays=self._relays,
                               migration_stats=self._migration_stats.snapshot, cluster_admin=self._controller,
                               max_body_bytes=self.args.max_body_bytes)
        app = build_openai_app(lambda: self.engine, settings)
        self._serving = app.state.serving
        return app

    async def drain(self, deadline: float) -> None:
        """Stops accepting generation requests, lets the running ones finish until `DRAIN_MARGIN_S` before
        `deadline` (time.time()), then aborts the rest, and waits briefly for their last bytes to go out."""
        serving = getattr(self, "_serving", None)
        if serving is None:
            return
        serving.is_draining = True
        while serving.num_runs and time.time() < deadline - DRAIN_MARGIN_S:
            await asyncio.sleep(0.1)
        if serving.num_runs:
            logger.info("replica %s: aborting %d requests still running at the drain deadline",
                        self.replica_id, serving.num_runs)
            await serving.abort_all()
        flush_until = time.monotonic() + DRAIN_MARGIN_S / 2
        while serving.num_runs and time.monotonic() < flush_until:
            await asyncio.sleep(0.05)

    async def record_routing_stats(self) -> dict[str, Any]:
        """Serve carries routing stats as a dict: the `RoutingStats` record's (`is_stopped` while the engine
        fails its health check: routed to last until Serve replaces the replica)."""
        stats = self.engine.stats()
        try:
            await self.engine.check_health()
            is_stopped = False
        except EngineDeadError:
            is_stopped = True
        return RoutingStats(kv_free_chunks=stats.kv_chunks_free, num_waiting=stats.num_waiting, timestamp=time.time(),
                            kv_usage=stats.kv_usage, num_running=stats.num_running,
                            is_draining=self._is_draining, is_stopped=is_stopped).to_dict()

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for Serve's autoscaler (used by deployments/cluster/autoscaling.py:kv_packing_policy)."""
        stats = self.engine.stats()
        return autoscaling_metrics(stats, self._is_draining, self._started_at, self._relays.num_live)

    # ---- destination side of a migration (called by the source replica through a targeted handle) ----
    def _migration_endpoint(self, target_replica: str) -> MigrationEndpoint:
        if target_replica != self.replica_id:  # the router sent it to the wrong replica: never act on it
            raise RuntimeError(f"migration call for {target_replica} reached {self.replica_id}")
        if self._endpoint is None:
            raise RuntimeError("this replica's engine does not support migration")
        return self._endpoint

    async def migration_reserve(self, request_id: str, num_tokens: int, target_replica: str) -> bool:
        return await self._migration_endpoint(target_replica).reserve(request_id, num_tokens)

    async def migration_write(self, request_id: str, stage: KVStage, target_replica: str) -> None:
        await self._migration_endpoint(target_replica).write_kv(request_id, stage)

    async def migration_adopt(self, snapshot: RequestSnapshot, tail: KVStage | None, num_kv_tokens: int,
                              target_replica: str) -> AdoptStream:
        async for item in self._migration_endpoint(target_replica).adopt(snapshot, tail, num_kv_tokens):
            yield item

    async def migration_cancel(self, request_id: str, target_replica: str) -> None:
        await self._migration_endpoint(target_replica).cancel(request_id)

    async def migration_connect(self, source_replica: str, address: ChannelAddress, target_replica: str) -> None:
        """torch_distributed transport: join the source's point-to-point group (deployments/migration/kv_channel.py)."""
        await self._migration_endpoint(target_replica).join(source_replica, address)

    async def migration_receive(self, request_id: str, header: StageHeader, source_replica: str,
                                target_replica: str) -> None:
        """torch_distributed transport: receive one KV stage from the source and write it."""
        await self._migration_endpoint(target_replica).receive_kv(request_id, header, source_replica)

    async def check_health(self) -> None:
        await self.engine.check_health()
        if self._built.failed_ranks is not None and (failed := self._built.failed_ranks()):
            raise RuntimeError(f"tensor-parallel ranks {failed} stopped")

    async def _push_telemetry(self) -> None:
        period_s = self.args.telemetry_period_s
        num_failures = 0
        urgent = False
        while True:
            try:
                engine_stats = self.engine.stats()
                report = ReplicaReport(ReplicaStats.of(engine_stats), tuple(self.engine.memory_telemetry()))
                if self._cooperation is not None:
                    report = dataclasses.replace(report, dropping=self._cooperation.status(engine_stats))
                    self._reported_peak = report.dropping.client_peak_chunks
                if self._migrations is not None:
                    await self._endpoint.expire_stale()
                    report = await self._with_migration(report, wait_s=0.0 if urgent else period_s)
                self._follow(await self._controller.report(report))
                num_failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                num_failures += 1
                if num_failures in (1, 10) or num_failures % 100 == 0:
                    logger.warning("replica %s: telemetry report failed %d times: %r", self.replica_id,
                                   num_failures, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._report_now.wait(), period_s)
            urgent = self._report_now.is_set()
            self._report_now.clear()

    async def _with_migration(self, report: ReplicaReport, wait_s: float) -> ReplicaReport:
        """The requests' loads come from the engine thread between two steps, and a long step (a big prefill,
        a pair's pipelined step) can hold it past a telemetry period: the call then stays pending across
        reports, never dropped and asked again (which would never answer while every step is that long), and
        until it answers (within `wait_s`: none for an urgent report) the previous load goes out again (with
        fresh counters)."""
        if self._load_task is None:
            self._load_task = asyncio.ensure_future(
                self._migrations.load_report(self.replica_id, self.engine.stats, self._started_at))
        done, _ = await asyncio.wait({self._load_task}, timeout=wait_s)
        if done:
            task, self._load_task = self._load_task, None
            self._last_load = task.result()
        return dataclasses.replace(report, load=self._last_load, migrating=tuple(self._migrations.migrating),
                                   migration=self._migration_stats.snapshot())

    async def _receive_layer_orders(self) -> None:
        """KunServe: a long poll for this replica's layer orders beside the telemetry loop, so an order made on
        another replica's report (this one's pair forming) starts here at once, not with this replica's next
        report."""
        while True:
            try:
                orders = await self._controller.wait_layer_orders(LAYER_ORDERS_POLL_S)
            except asyncio.CancelledError:
                raise
            except Exception:  # the controller restarting: its next answer, or the telemetry's replies, bring them
                await asyncio.sleep(self.args.telemetry_period_s)
                continue
            self._follow_layer_orders(orders)

    def _follow_layer_orders(self, orders: tuple[LayerOrder, ...]) -> None:
        for layer_order in orders:
            task = asyncio.get_running_loop().create_task(self._cooperation.follow(layer_order))
            task.add_done_callback(self._log_failure)

    def _follow(self, reply: ControllerReply) -> None:
        """Starts the migrations the controller ordered (a busy or unknown one simply does not start: the
        controller sees it missing from `migrating` in the next report)."""
        self._is_draining = reply.is_draining
        if reply.shutdown_at is not None and getattr(self, "_drain_task", None) is None:
            logger.info("replica %s: draining for shutdown (%.1f s left)", self.replica_id,
                        reply.shutdown_at - time.time())
            self._drain_task = asyncio.get_running_loop().create_task(self.drain(reply.shutdown_at))
        if self._cooperation is not None:
            self._follow_layer_orders(reply.layer_orders)
        for order in reply.orders:
            if self._migrations is not None and order.source == self.replica_id:
                task = self._migrations.submit(order.request_id, order.target, order.mode)
                logger.info("replica %s: migration order %s -> %s %s", self.replica_id, order.request_id,
                            order.target, "started" if task is not None else "not started (busy)")

    def _log_failure(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            logger.warning("replica %s: layer order failed: %r", self.replica_id, task.exception())

    async def __del__(self):
        # Also runs after a failed __init__: every step checks that its part was set up. Serve calls this
        # once its own drain found no request in flight, or at the end of graceful_shutdown_timeout_s; what
        # arrived meanwhile is ended cleanly by a short drain.
        with contextlib.suppress(Exception):
            await self.drain(time.time() + DRAIN_MARGIN_S)
        for task in (getattr(self, "_telemetry_task", None), getattr(self, "_orders_task", None)):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        if getattr(self, "_migrations", None) is not None:
            with contextlib.suppress(BaseException):
                await self._migrations.shutdown()
            with contextlib.suppress(BaseException):
                await self._endpoint.shutdown()
            self._channels.close()
        if getattr(self, "_controller", None) is not None:
            with contextlib.suppress(Exception):
                await self._controller.deregister()
        built = getattr(self, "_built", None)
        if built is None:
            return
        try:
            await built.engine.shutdown()
        finally:
            if built.cleanup is not None:
                await asyncio.to_thread(built.cleanup)
