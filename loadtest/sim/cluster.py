"""The simulated cluster: replicas, the router's ranking, the controller and autoscaling, on one virtual clock.

Everything that decides runs the deployed code: each replica is a `SimReplica` (the engine's scheduler,
KV manager and pool); requests are routed by `deployments.cluster.ranking.rank_by_headroom` over the
`RoutingStats` each replica publishes every `routing_period_s`, then (like Ray Serve inside a group) to the
replica with the fewest ongoing requests; every `telemetry_period_s` each replica sends a `ReplicaReport`
to a `ClusterCore` (the controller's logic: `MigrationPlanner` + the migration policy) and follows the
`ControllerReply`: migration orders run with engine/migration.py's `reserve` / `release` / `cancel` and the
live source's copy-or-recompute choice (`choose_mode`), a copy taking `copy_s` of virtual time while the
request keeps decoding at the source. With `autoscale`, replicas start (ready after `startup_s`) and stop
as Ray Serve's queue-length policy says (modelled here: desired = ceil(ongoing / target), held for
`upscale_delay_s` / `downscale_delay_s`), downwards through `packing_decision` (deployments/cluster/
autoscaling.py) when the migration policy packs: the newest replica goes once it is drained and empty.
Without packing, Serve stops the newest replica: it gets no new request and leaves once its requests have
finished (we let them finish; Serve would cut them after `graceful_shutdown_timeout_s`).
"""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, field
from typing import Any

from deployments.cluster.autoscaling import packing_decision
from deployments.cluster.ranking import rank_by_headroom
from deployments.cluster.state import ClusterCore
from deployments.migration.source import choose_mode
from deployments.telemetry import MigrationOrder, ReplicaReport, ReplicaStats, RoutingStats, replica_load
from engine import migration as engine_migration
from engine.core.request import Request, RequestStatus
from loadtest.sim.replica import ReplicaConfig, SimEngine, SimReplica, sim_request
from loadtest.sim.trace import TraceRequest, clip_to_context


@dataclass(frozen=True)
class ClusterConfig:
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    num_replicas: int = 4  # the fleet (autoscale: at start)
    migration_policy: str = "none"  # deployments/migration/policy.py
    migration_policy_options: dict[str, Any] = field(default_factory=dict)
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int = 16
    target_ongoing_requests: float = 48.0  # Serve's autoscaling_config.target_ongoing_requests
    upscale_delay_s: float = 30.0  # Serve's defaults
    downscale_delay_s: float = 600.0
    autoscale_period_s: float = 10.0
    startup_s: float = 60.0  # a new replica serves this long after it is asked for (weights, warm-up)
    routing_period_s: float = 0.5  # request_routing_stats_period_s
    stats_max_age_s: float = 2.0  # simulated stats come on time (no Serve controller): not STATS_MAX_AGE_S
    telemetry_period_s: float = 1.0  # the deployed replicas push every 0.5 s; 1 s here (speed)
    sample_period_s: float = 10.0  # the timeline's pool samples (the plots)
    max_concurrent_migrations: int = 2
    plan_interval_s: float = 1.0
    migration_cooldown_s: float = 10.0
    seed: int = 0


@dataclass(frozen=True)
class Sample:
    time_s: float
    num_replicas: int
    pool_chunks: dict[str, int]  # chunks each pool client (weights, kv, activations) holds, all replicas
    kv_used_chunks: int
    kv_capacity_chunks: int


@dataclass
class RequestRecord:
    trace: TraceRequest
    request_id: str
    first_token_s: float | None = None
    finish_s: float | None = None
    num_finishes: int = 0
    num_migrations: int = 0


@dataclass
class _Copy:
    request_id: str
    source: SimReplica
    target: SimReplica
    reserved_tokens: int


@dataclass
class _Live:
    replica: SimReplica
    state: str  # starting | active | stopping
    stats: RoutingStats | None = None
    migrating: set[str] = field(default_factory=set)
    is_draining: bool = False
    routed_since: int = 0  # requests routed here since `stats` were published (the router counts them too)

    def publish(self, stats: RoutingStats) -> None:
        self.stats = stats
        self.routed_since = 0


_STEP, _TELEMETRY, _ROUTING, _AUTOSCALE, _READY, _COPY = range(6)


class Cluster:
    def __init__(self, trace: tuple[TraceRequest, ...], config: ClusterConfig):
        self.config = config
        trace = clip_to_context(trace, SimEngine.max_tokens(config.replica))  # as the engine's validate() allows
        self.trace = trace
        self.now = 0.0
        self.rng = random.Random(config.seed)
        self.records = [RequestRecord(t, f"q{i}") for i, t in enumerate(trace)]
        self._by_id = {record.request_id: record for record in self.records}
        self.core = ClusterCore(config.migration_policy, stale_after_s=3 * config.telemetry_period_s,
                                expire_after_s=10 * config.telemetry_period_s,
                                migration_policy_options=config.migration_policy_options,
                                max_concurrent_migrations=config.max_concurrent_migrations,
                                plan_interval_s=config.plan_interval_s,
                                migration_cooldown_s=config.migration_cooldown_s, clock=lambda: self.now)
        self.live: dict[str, _Live] = {}
        self.replicas: list[SimReplica] = []  # every replica ever started
        self.replica_seconds = 0.0
        self.peak_replicas = 0
        self.timeline: list[Sample] = []  # every ~10 s
        self.counts = dict.fromkeys(("copies", "recomputes", "aborted", "refused", "bytes_moved"), 0)
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._num_started = 0
        self._scale_wish: tuple[int, float] | None = None  # (desired, since)
        self._last_count_change = 0.0
        for _ in range(config.num_replicas):
            self._start_replica(0.0, ready=True)

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> Cluster:
        self._push(0.0, _ROUTING, None)
        self._push(0.0, _TELEMETRY, None)
        if self.config.autoscale:
            self._push(self.config.autoscale_period_s, _AUTOSCALE, None)
        index, unfinished = 0, len(self.records)
        self._unfinished = unfinished
        while self._unfinished:
            arrival = self.records[index].trace.arrival_s if index < len(self.records) else math.inf
            if self._events and self._events[0][0] <= arrival:
                when, _, kind, payload = heapq.heappop(self._events)
                self._advance(when)
                self._handle(kind, payload)
            elif index < len(self.records):
                self._advance(arrival)
                self._arrive(self.records[index])
                index += 1
            else:
                raise AssertionError("requests are left but nothing will happen: the simulation is stuck")
        self._advance(self.now)
        return self

    def _advance(self, when: float) -> None:
        self.replica_seconds += len(self.live) * (when - self.now)
        self.now = when

    def _push(self, when: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, payload))

    def _handle(self, kind: int, payload: Any) -> None:
        if kind == _STEP:
            replica, version = payload
            if version == replica.version and replica.replica_id in self.live:
                replica.complete()
                self._kick(replica)
        elif kind == _ROUTING:
            for live in self.live.values():
                if live.state != "starting":
                    live.publish(self._routing_stats(live))
            self._push(self.now + self.config.routing_period_s, _ROUTING, None)
        elif kind == _TELEMETRY:
            self._telemetry()
            self._push(self.now + self.config.telemetry_period_s, _TELEMETRY, None)
        elif kind == _AUTOSCALE:
            self._autoscale()
            self._push(self.now + self.config.autoscale_period_s, _AUTOSCALE, None)
        elif kind == _READY:
            if payload in self.live:
                self.live[payload].state = "active"
                self.live[payload].publish(self._routing_stats(self.live[payload]))
        else:
            self._commit(payload)

    def _kick(self, replica: SimReplica) -> None:
        if replica.busy_until is None:
            end = replica.start(self.now)
            if end is not None:
                self._push(end, _STEP, (replica, replica.version))
        self._release_if_done(replica)

    # ---- requests ---------------------------------------------------------------------------------
    def _arrive(self, record: RequestRecord) -> None:
        candidates = [live for live in self.live.values() if live.state == "active"]
        groups = rank_by_headroom(candidates, self.now, self.config.stats_max_age_s, stats_of=lambda live: live.stats,
                                  rng=self.rng, routed_since=lambda live: live.routed_since)
        group = next(group for group in groups if group)
        live = min(group, key=lambda live: live.replica.num_ongoing())  # Serve: the shortest queue in a group
        live.routed_since += 1
        trace = record.trace
        self._add(live, sim_request(record.request_id, trace.prompt_tokens, trace.output_tokens, trace.arrival_s))

    def _add(self, live: _Live, request: Request) -> None:
        """The routed request joins its replica (KunServe's cluster: the pipeline its replica is part of)."""
        live.replica.interrupt(self.now)
        live.replica.add(request)
        self._kick(live.replica)

    def _on_finish(self, request: Request, when: float) -> None:
        record = self._by_id[request.request_id]
        record.num_finishes += 1
        record.finish_s = when
        record.first_token_s = request.first_token_time
        self._unfinished -= 1

    # ---- telemetry and the controller --------------------------------------------------------------
    def _routing_stats(self, live: _Live) -> RoutingStats:
        engine = live.replica.engine
        return RoutingStats(kv_free_chunks=engine.kv.num_available_chunks(), num_waiting=len(engine.scheduler.waiting),
                            timestamp=self.now, num_running=len(engine.scheduler.running),
                            is_draining=live.is_draining)

    def _telemetry(self) -> None:
        plans = self.config.migration_policy != "none"
        for replica_id, live in list(self.live.items()):
            if live.state == "starting":
                continue
            engine = live.replica.engine
            used, free = engine.kv.num_used_chunks(), engine.kv.num_available_chunks()
            stats = ReplicaStats(len(engine.scheduler.running), len(engine.scheduler.waiting),
                                 len(engine.scheduler.swapped), used, free)
            load = replica_load(replica_id, stats, engine_migration.request_loads(engine), live.replica.started_at,
                                live.migrating, engine_migration.host_room(engine)) if plans else None
            reply = self.core.report(replica_id, ReplicaReport(stats, load=load, migrating=tuple(live.migrating)))
            live.is_draining = reply.is_draining
            for order in reply.orders:
                self._migrate(order)
        if not self.timeline or self.now - self.timeline[-1].time_s >= self.config.sample_period_s:
            self.timeline.append(self._sample())

    def _sample(self) -> Sample:
        pools: dict[str, int] = {}
        capacity = used = 0
        for live in self.live.values():
            engine = live.replica.engine
            for client in engine.pool.clients:
                pools[client] = pools.get(client, 0) + engine.pool.num_held(client)
            used += engine.kv.num_used_chunks()
            capacity += engine.kv_capacity_chunks()
        return Sample(self.now, len(self.live), pools, used, capacity)

    def _migrate(self, order: MigrationOrder) -> None:
        source, target = self.live.get(order.source), self.live.get(order.target)
        if source is None or target is None or target.state != "active":
            self.counts["refused"] += 1
            return
        source.replica.interrupt(self.now)
        target.replica.interrupt(self.now)
        engine = source.replica.engine
        if not engine_migration.is_migratable(engine, order.request_id):
            self.counts["refused"] += 1
            self._kick(source.replica)
            self._kick(target.replica)
            return
        request = engine.scheduler.requests[order.request_id]
        mode = order.mode
        copy_s = engine.cost.copy_s(request.num_computed_tokens)
        if mode == "auto":
            costs = engine.cost.migration_cost_inputs(engine.config.max_num_batched_tokens)
            mode, copy_s, _ = choose_mode(request.num_computed_tokens, costs, engine.device.network_bytes_per_s)
        if mode == "recompute":
            self._move(source, target, request, num_kv_tokens=0)
            self.counts["recomputes"] += 1
        elif engine_migration.reserve(target.replica.engine, order.request_id, request.num_computed_tokens):
            source.migrating.add(order.request_id)
            self._push(self.now + copy_s, _COPY, _Copy(order.request_id, source.replica, target.replica,
                                                       request.num_computed_tokens + engine.kv_spec.tokens_per_page))
        else:
            self.counts["refused"] += 1
        self._kick(source.replica)
        self._kick(target.replica)

    def _commit(self, copy: _Copy) -> None:
        """The copy is done: the request switches over if it is still a running decode that fits its reservation."""
        source, target = self.live.get(copy.source.replica_id), self.live.get(copy.target.replica_id)
        if source is not None:
            source.migrating.discard(copy.request_id)
        if target is None:
            self.counts["aborted"] += 1
            return
        copy.source.interrupt(self.now)
        copy.target.interrupt(self.now)
        request = copy.source.engine.scheduler.requests.get(copy.request_id) if source is not None else None
        if request is None or not engine_migration.is_migratable(copy.source.engine, copy.request_id) \
                or request.num_computed_tokens > copy.reserved_tokens:
            engine_migration.cancel(copy.target.engine, copy.request_id)
            self.counts["aborted"] += 1
        else:
            self._move(source, target, request, num_kv_tokens=request.num_computed_tokens)
            self.counts["copies"] += 1
            self.counts["bytes_moved"] += request.num_computed_tokens * copy.source.engine.model.kv_bytes_per_token
        self._kick(copy.source)
        self._kick(copy.target)

    def _move(self, source: _Live, target: _Live, request: Request, num_kv_tokens: int) -> None:
        """Source: pause and release (engine/migration.py). Target: attach with its KV, or queue to recompute."""
        source.replica.engine.scheduler.pause(request)
        engine_migration.release(source.replica.engine, request.request_id)
        moved = sim_request(request.request_id, len(request.prompt_token_ids), request.params.max_tokens,
                            request.arrival_time, tuple(request.output_token_ids))
        moved.first_token_time = request.first_token_time
        scheduler = target.replica.engine.scheduler
        if num_kv_tokens:
            target.replica.engine.kv.finish_import(request.request_id, num_kv_tokens)
            moved.num_computed_tokens = num_kv_tokens
            scheduler.attach(moved)
        else:
            scheduler.add(moved)
        self._by_id[request.request_id].num_migrations += 1
        assert moved.status in (RequestStatus.RUNNING, RequestStatus.WAITING)

    # ---- the fleet --------------------------------------------------------------------------------
    def _start_replica(self, now: float, ready: bool = False) -> None:
        replica = SimReplica(f"replica-{self._num_started}", self.config.replica, now, self._on_finish)
        self._num_started += 1
        self.replicas.append(replica)
        self.live[replica.replica_id] = _Live(replica, "active" if ready else "starting")
        if ready:
            self.live[replica.replica_id].publish(self._routing_stats(self.live[replica.replica_id]))
        else:
            self._push(now + self.config.startup_s, _READY, replica.replica_id)
        self.peak_replicas = max(self.peak_replicas, len(self.live))

    def _release_if_done(self, replica: SimReplica) -> None:
        live = self.live.get(replica.replica_id)
        if live is not None and live.state == "stopping" and replica.engine.is_idle() and not live.migrating \
                and replica.busy_until is None:
            del self.live[replica.replica_id]
            self.core.deregister(replica.replica_id)
            replica.engine.close()

    def _autoscale(self) -> None:
        config = self.config
        serving = [live for live in self.live.values() if live.state != "stopping"]
        ongoing = sum(live.replica.num_ongoing() for live in serving)
        desired = min(config.max_replicas,
                      max(config.min_replicas, math.ceil(ongoing / config.target_ongoing_requests)))
        current = len(serving)
        # Serve's delays: a wish must hold for the delay before it is acted on
        if desired == current:
            self._scale_wish = None
        elif self._scale_wish is None or (self._scale_wish[0] > current) != (desired > current):
            self._scale_wish = (desired, self.now)
        delay = config.upscale_delay_s if desired > current else config.downscale_delay_s
        if desired != current and self.now - self._scale_wish[1] < delay:
            desired = current
        if config.migration_policy == "balance+pack":
            running = [live.replica.replica_id for live in serving if live.state == "active"]
            drained = {rid: float(self.live[rid].is_draining and self.live[rid].replica.engine.is_idle()
                                  and not self.live[rid].migrating) for rid in running}
            started = {rid: self.live[rid].replica.started_at for rid in running}
            desired = packing_decision(desired, current, running, drained, started)
        for _ in range(desired - current):
            self._start_replica(self.now)
        if desired < current:
            newest = max(serving, key=lambda live: (live.replica.started_at, live.replica.replica_id))
            newest.state = "stopping"
            self._scale_wish = None
            self._release_if_done(newest.replica)
