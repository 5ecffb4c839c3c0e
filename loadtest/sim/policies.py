"""Cluster policies as pure functions: a snapshot of the cluster in, a plan out.

Nothing here knows about the simulator, Ray or an engine: `ClusterView` is what a controller can see
from replica telemetry (KV chunks in use, what the queue needs, the requests that could be moved) and
`Plan` is what it would do (migrations, replicas to drain, release, or start). The policies:

- `none`: a fixed fleet, no migration.
- `balance`: a fixed fleet; when a replica's KV demand is above the high watermark while another's is
  below the low one, move the request that best fits half the gap from the first to the second (only
  moves that shrink the gap).
- `drain`: autoscaling without migration: when the recent peak demand fits on fewer replicas, stop
  routing to the least loaded one and release it once its requests have finished.
- `balance+pack`: `balance`, plus Mell-style online packing: the replica being drained is emptied by
  migrating its requests (largest first, each to the replica with the most room) within the migration
  budget, and released.
Each migration copies the KV or recomputes it at the destination, whichever the cost model says is
cheaper. Policies are objects in `POLICIES`, made by `create_policy(name)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from loadtest.sim.model import CostModel, ModelShape

REPLICA_STATES = ("starting", "active", "draining")
MIGRATION_MODES = ("copy", "recompute")


@dataclass(frozen=True)
class RequestView:
    request_id: str
    num_kv_tokens: int  # tokens whose KV the replica holds: what a copy moves
    num_chunks: int  # KV chunks it holds

    def __post_init__(self) -> None:
        if self.num_kv_tokens < 0 or self.num_chunks < 0:
            raise ValueError("token and chunk counts must be >= 0")


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    state: str  # one of REPLICA_STATES
    num_kv_chunks: int  # the KV pool
    num_used_chunks: int  # held by running requests and by reservations of incoming migrations
    num_waiting_chunks: int  # what the queued requests need to start
    num_running: int  # admitted (prefilling or decoding) plus reserved incoming migrations
    num_waiting: int
    max_running: int
    num_outgoing: int = 0  # migrations leaving now
    num_incoming: int = 0
    requests: tuple[RequestView, ...] = ()  # decoding requests that could be moved (none already leaving)

    def __post_init__(self) -> None:
        if self.state not in REPLICA_STATES:
            raise ValueError(f"state must be one of {REPLICA_STATES}, got {self.state!r}")
        if self.num_kv_chunks < 1 or self.max_running < 1:
            raise ValueError("num_kv_chunks and max_running must be >= 1")
        if min(self.num_used_chunks, self.num_waiting_chunks, self.num_running, self.num_waiting,
               self.num_outgoing, self.num_incoming) < 0:
            raise ValueError("counts must be >= 0")

    @property
    def demand_chunks(self) -> int:
        return self.num_used_chunks + self.num_waiting_chunks

    @property
    def load(self) -> float:
        """The binding share of the replica: KV (held and wanted) or batch seats."""
        return max(self.demand_chunks / self.num_kv_chunks, (self.num_running + self.num_waiting) / self.max_running)

    @property
    def is_empty(self) -> bool:
        return not (self.num_used_chunks or self.num_running or self.num_waiting or self.num_outgoing
                    or self.num_incoming)


@dataclass(frozen=True)
class ClusterView:
    time_s: float
    replicas: tuple[ReplicaView, ...]  # every replica not yet released
    max_replicas: int
    recent_peak_demand: float  # the largest `cluster_demand` over the scale-down window, now included

    def __post_init__(self) -> None:
        if self.max_replicas < 1 or self.recent_peak_demand < 0:
            raise ValueError("max_replicas must be >= 1 and recent_peak_demand >= 0")


def cluster_demand(replicas: tuple[ReplicaView, ...]) -> float:
    """The load in replicas' worth: KV demand over one replica's pool, or requests over one's seats."""
    if not replicas:
        return 0.0
    chunks = sum(r.demand_chunks for r in replicas) / replicas[0].num_kv_chunks
    seats = sum(r.num_running + r.num_waiting for r in replicas) / replicas[0].max_running
    return max(chunks, seats)


@dataclass(frozen=True)
class PolicyConfig:
    cost: CostModel = field(default_factory=CostModel)
    model: ModelShape = field(default_factory=ModelShape)
    high_watermark: float = 0.85  # balance moves from above this; nothing is moved to above it
    low_watermark: float = 0.5  # balance moves to below this
    target_load: float = 0.7  # autoscaling sizes the fleet so the recent peak fills replicas this much
    min_replicas: int = 1
    max_migrations_per_tick: int = 16  # the migration budget per policy interval, cluster-wide
    max_outgoing_per_replica: int = 4  # concurrent migrations leaving one replica
    max_incoming_per_replica: int = 4

    def __post_init__(self) -> None:
        if not 0 < self.low_watermark < self.high_watermark <= 1 or not 0 < self.target_load <= 1:
            raise ValueError("need 0 < low_watermark < high_watermark <= 1 and 0 < target_load <= 1")
        if min(self.min_replicas, self.max_outgoing_per_replica, self.max_incoming_per_replica) < 1:
            raise ValueError("min_replicas and the per-replica migration limits must be >= 1")
        if self.max_migrations_per_tick < 0:
            raise ValueError("max_migrations_per_tick must be >= 0")


@dataclass(frozen=True)
class Migration:
    request_id: str
    source: str
    destination: str
    mode: str  # "copy" (KV bytes over the network) | "recompute" (tokens only; prefill at the destination)
    num_kv_tokens: int
    num_chunks: int
    seconds: float  # the cost model's estimate of the chosen mode

    def __post_init__(self) -> None:
        if self.mode not in MIGRATION_MODES:
            raise ValueError(f"mode must be one of {MIGRATION_MODES}, got {self.mode!r}")
        if self.source == self.destination:
            raise ValueError("a migration needs two different replicas")
        if min(self.num_kv_tokens, self.num_chunks, self.seconds) < 0:
            raise ValueError("num_kv_tokens, num_chunks and seconds must be >= 0")


@dataclass(frozen=True)
class Plan:
    migrations: tuple[Migration, ...] = ()
    drain: tuple[str, ...] = ()  # stop routing to these; they leave once empty
    undrain: tuple[str, ...] = ()  # draining replicas taken back into service
    release: tuple[str, ...] = ()  # empty draining replicas to shut down
    reroute: tuple[str, ...] = ()  # draining replicas whose queued requests (no KV yet) go elsewhere
    num_to_start: int = 0

    def __post_init__(self) -> None:
        if self.num_to_start < 0:
            raise ValueError("num_to_start must be >= 0")


def choose_mode(num_kv_tokens: int, config: PolicyConfig) -> tuple[str, float]:
    """Mell's adaptive migration: copy the KV or recompute it, whichever the cost model says is faster."""
    copy = config.cost.copy_s(num_kv_tokens, config.model)
    recompute = config.cost.recompute_s(num_kv_tokens)
    return ("copy", copy) if copy <= recompute else ("recompute", recompute)


class _Ledger:
    """Mutable copies of the numbers a plan changes, so moves planned in one tick see each other."""

    def __init__(self, view: ClusterView, config: PolicyConfig) -> None:
        self.config = config
        self.replicas = {r.replica_id: r for r in view.replicas}
        self.demand = {r.replica_id: r.demand_chunks for r in view.replicas}
        self.running = {r.replica_id: r.num_running for r in view.replicas}
        self.outgoing = {r.replica_id: r.num_outgoing for r in view.replicas}
        self.incoming = {r.replica_id: r.num_incoming for r in view.replicas}
        self.moved: set[str] = set()
        self.migrations: list[Migration] = []

    @property
    def budget_left(self) -> int:
        return self.config.max_migrations_per_tick - len(self.migrations)

    def fraction(self, replica_id: str) -> float:
        return self.demand[replica_id] / self.replicas[replica_id].num_kv_chunks

    def can_send(self, replica_id: str) -> bool:
        return self.budget_left > 0 and self.outgoing[replica_id] < self.config.max_outgoing_per_replica

    def room(self, replica_id: str, num_chunks: int) -> bool:
        replica = self.replicas[replica_id]
        return (self.running[replica_id] < replica.max_running
                and self.incoming[replica_id] < self.config.max_incoming_per_replica
                and self.demand[replica_id] + num_chunks <= self.config.high_watermark * replica.num_kv_chunks)

    def movable(self, replica_id: str) -> list[RequestView]:
        return [q for q in self.replicas[replica_id].requests if q.request_id not in self.moved]

    def move(self, request: RequestView, source: str, destination: str) -> None:
        mode, seconds = choose_mode(request.num_kv_tokens, self.config)
        self.migrations.append(Migration(request.request_id, source, destination, mode, request.num_kv_tokens,
                                         request.num_chunks, seconds))
        self.moved.add(request.request_id)
        self.demand[source] -= request.num_chunks
        self.demand[destination] += request.num_chunks
        self.running[source] -= 1
        self.running[destination] += 1
        self.outgoing[source] += 1
        self.incoming[destination] += 1


def _balance(ledger: _Ledger, serving: list[str]) -> None:
    config = ledger.config
    while ledger.budget_left > 0 and len(serving) > 1:
        ordered = sorted(serving, key=lambda rid: (ledger.fraction(rid), rid))
        source, destination = ordered[-1], ordered[0]
        if ledger.fraction(source) < config.high_watermark or ledger.fraction(destination) > config.low_watermark:
            return
        if not ledger.can_send(source):
            return
        half_gap = (ledger.demand[source] - ledger.demand[destination]) / 2
        fitting = [q for q in ledger.movable(source)
                   if 0 < q.num_chunks <= half_gap and ledger.room(destination, q.num_chunks)]
        if not fitting:
            return
        ledger.move(max(fitting, key=lambda q: (q.num_chunks, q.request_id)), source, destination)


def plan_balance(view: ClusterView, config: PolicyConfig) -> Plan:
    """Moves between active replicas from above the high watermark to below the low one."""
    ledger = _Ledger(view, config)
    _balance(ledger, [r.replica_id for r in view.replicas if r.state == "active"])
    return Plan(migrations=tuple(ledger.migrations))


def _pack(ledger: _Ledger, draining: list[str], serving: list[str]) -> None:
    """Empties draining replicas: largest request first, each to the serving replica with the most room."""
    for source in draining:
        for request in sorted(ledger.movable(source), key=lambda q: (-q.num_chunks, q.request_id)):
            if not ledger.can_send(source):
                break
            fits = [rid for rid in serving if ledger.room(rid, request.num_chunks)]
            if fits:
                ledger.move(request, source, min(fits, key=lambda rid: (ledger.fraction(rid), rid)))


def drain_candidate(active: list[ReplicaView]) -> ReplicaView:
    """The replica a scale-down drains: the least KV demand, then the fewest requests."""
    return min(active, key=lambda r: (r.demand_chunks, r.num_running + r.num_waiting, r.replica_id))


def plan_scale(view: ClusterView, config: PolicyConfig, migrate: bool, balance: bool = False) -> Plan:
    """Autoscaling: size the fleet to the recent peak demand; drain one replica at a time (the least
    loaded), moving its requests away when `migrate`; release drained replicas once empty."""
    active = [r for r in view.replicas if r.state == "active"]
    starting = [r for r in view.replicas if r.state == "starting"]
    draining = [r for r in view.replicas if r.state == "draining"]
    needed = max(config.min_replicas, math.ceil(view.recent_peak_demand / config.target_load - 1e-9))
    needed = min(needed, view.max_replicas)
    plan = Plan()
    num_serving = len(active) + len(starting)
    if needed > num_serving:
        back = sorted(draining, key=lambda r: (-r.demand_chunks, r.replica_id))[: needed - num_serving]
        free_places = view.max_replicas - len(view.replicas)
        plan = replace(plan, undrain=tuple(r.replica_id for r in back),
                       num_to_start=max(0, min(needed - num_serving - len(back), free_places)))
        draining = [r for r in draining if r not in back]
        active = active + back
    elif needed < len(active) and not draining and not starting:
        victim = drain_candidate(active)
        plan = replace(plan, drain=(victim.replica_id,))
        draining = [replace(victim, state="draining")]
        active = [r for r in active if r is not victim]
    ledger = _Ledger(view, config)
    serving = [r.replica_id for r in active]
    if migrate:
        _pack(ledger, [r.replica_id for r in draining], serving)
    if balance:
        _balance(ledger, serving)
    empty = tuple(r.replica_id for r in draining if r.is_empty and r.replica_id not in plan.drain)
    reroute = tuple(r.replica_id for r in draining if r.num_waiting)
    return replace(plan, migrations=tuple(ledger.migrations), release=empty, reroute=reroute)


class PackingPolicy:
    name = "none"

    def plan(self, view: ClusterView, config: PolicyConfig) -> Plan:
        return Plan()

    def sources(self, view: ClusterView, config: PolicyConfig) -> frozenset[str]:
        """Replicas the plan may move requests from: only their views need `requests` (the rest may
        leave them empty; the plan is the same)."""
        return frozenset()


class BalancePolicy(PackingPolicy):
    name = "balance"

    def plan(self, view: ClusterView, config: PolicyConfig) -> Plan:
        return plan_balance(view, config)

    def sources(self, view: ClusterView, config: PolicyConfig) -> frozenset[str]:
        return frozenset(r.replica_id for r in view.replicas
                         if r.state == "active" and r.demand_chunks >= config.high_watermark * r.num_kv_chunks)


class DrainPolicy(PackingPolicy):
    name = "drain"

    def plan(self, view: ClusterView, config: PolicyConfig) -> Plan:
        return plan_scale(view, config, migrate=False)


class BalancePackPolicy(BalancePolicy):
    name = "balance+pack"

    def plan(self, view: ClusterView, config: PolicyConfig) -> Plan:
        return plan_scale(view, config, migrate=True, balance=True)

    def sources(self, view: ClusterView, config: PolicyConfig) -> frozenset[str]:
        active = [r for r in view.replicas if r.state == "active"]
        draining = {r.replica_id for r in view.replicas if r.state == "draining"}
        candidate = {drain_candidate(active).replica_id} if len(active) > 1 else set()
        return super().sources(view, config) | draining | candidate


POLICIES: dict[str, type[PackingPolicy]] = {
    policy.name: policy for policy in (PackingPolicy, BalancePolicy, DrainPolicy, BalancePackPolicy)}


def create_policy(name: str) -> PackingPolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown packing policy {name!r}; known: {sorted(POLICIES)}") from None
