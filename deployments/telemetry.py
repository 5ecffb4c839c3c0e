"""Typed telemetry between replicas, the cluster controller, the router and the simulator (pure Python).

Nothing here imports Ray or the engine but `engine/host_split.py` (pure Python: the import rule the migration
policies share with the destination's engine), so the router (pickled by value into Serve's proxies) and the
simulator (loadtest/sim) import it cheaply. The records:

- `RoutingStats`: what a replica publishes for the router every `request_routing_stats_period_s` (Serve
  carries it as a dict: `to_dict` / `from_dict`, which returns None for a missing or partial one).
- `RequestLoad`, `ReplicaLoad`: one replica's KV load and its requests, what migration policies plan with
  (with `kv_offload: layerwise`, a request's cost with top layers on a host and a replica's host room:
  `ReplicaLoad.place` takes a request whole or with those layers on its host, the destination's own rule).
- `MigrationOrder`: one planned migration.
- `ReplicaReport`: one telemetry push to the controller (engine stats, pool telemetry, and the load and
  migration state when the replica can migrate: `load is None` means it cannot).
- `DropStatus`: a replica's KunServe parameter-dropping facts (layers, their chunks, its state and peer).
- `LayerOrder`: the controller's order to form a cooperative pair (drop layers) or to dissolve it (restore).
- `ControllerReply`: the controller's answer to a report (orders for that replica, whether it is drained).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

from engine.host_split import HostRoom, HostSplit, fewest_host_layers

MODES = ("auto", "copy", "recompute")


@dataclass(frozen=True)
class RoutingStats:
    kv_free_chunks: int  # what the KV cache could still take (free pool chunks included)
    num_waiting: int
    timestamp: float  # wall clock when published: the router ignores stale stats
    kv_usage: float = 0.0
    num_running: int = 0
    is_draining: bool = False  # the packing policy is emptying this replica: route here last
    # its engine stopped (or stalled): it fails every request until Serve's health check replaces it, and its
    # last stats look idle, which drew a closed-loop load's every new request there (481 in 13 s, seen once):
    # routed to only when no other replica can take the request
    is_stopped: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> RoutingStats | None:
        """The stats Serve holds for a replica; None while it has published none (or an incomplete dict)."""
        if not data:
            return None
        try:
            return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
        except TypeError:  # a required field is missing
            return None


@dataclass(frozen=True)
class RequestLoad:
    request_id: str
    num_tokens: int
    num_remaining: int  # output tokens it may still produce
    kv_chunks: int  # KV chunks it takes (on any replica: same model, same page size)
    is_migratable: bool = True
    status: str = "running"  # the engine's RequestStatus value
    host_splits: tuple[HostSplit, ...] = ()  # `layerwise`: what it takes with 1, 2, ... top layers on a host


@dataclass(frozen=True)
class ReplicaLoad:
    replica_id: str
    capacity_chunks: int  # KV chunks used + free
    used_chunks: int
    waiting_chunks: int = 0  # what its waiting and swapped requests need to run
    requests: tuple[RequestLoad, ...] = ()
    started_at: float = 0.0  # when the replica started (wall clock): Serve scales down the newest first
    host: HostRoom | None = None  # `kv_offload: layerwise`: what its host can take of migrated requests' layers
    # what its requests' KV will still grow by until their last possible token (max_tokens or the context
    # limit; EOS may end them earlier): KunServe's drop plan counts it, migration policies do not
    growth_chunks: int = 0

    @property
    def demand_chunks(self) -> int:
        return self.used_chunks + self.waiting_chunks

    @property
    def load(self) -> float:
        return self.demand_chunks / self.capacity_chunks if self.capacity_chunks else 1.0

    def moved(self, request: RequestLoad, incoming: bool) -> ReplicaLoad:
        """This replica after `request` left it (incoming=False) or arrived (incoming=True)."""
        if incoming:
            return replace(self, used_chunks=self.used_chunks + request.kv_chunks,
                           requests=(*self.requests, replace(request, is_migratable=False)))
        return replace(self, used_chunks=max(0, self.used_chunks - request.kv_chunks),
                       requests=tuple(r for r in self.requests if r.request_id != request.request_id))

    def place(self, request: RequestLoad, limit: float) -> Placement | None:
        """This replica after taking `request` with its demand kept at most `limit` x its capacity: the whole
        KV on the device if that fits, else (a `layerwise` replica, `host` set) the fewest top layers on its host
        that let the device part fit, as long as the host holds them (`fewest_host_layers`: the rule the
        destination's reserve applies). None if neither."""
        room = math.floor(limit * self.capacity_chunks + 1e-9) - self.demand_chunks
        if request.kv_chunks <= room:
            return Placement(self.moved(request, incoming=True), 0)
        if self.host is None:
            return None
        split = fewest_host_layers(request.host_splits, room, self.host)
        if split is None:
            return None
        after = replace(self, used_chunks=self.used_chunks + split.device_chunks,
                        requests=(*self.requests, replace(request, is_migratable=False)),
                        host=replace(self.host, pages=self.host.pages - split.host_pages))
        return Placement(after, split.num_host_layers)


class Placement(NamedTuple):
    load: ReplicaLoad  # the destination after taking the request
    num_host_layers: int  # its top layers that go onto the destination's host (0: all on the device)


@dataclass(frozen=True)
class MigrationOrder:
    request_id: str
    source: str
    target: str
    mode: str = "auto"  # auto: the source chooses copy or recompute from its cost model
    reason: str = "balance"  # balance | pack | forced

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.source == self.target:
            raise ValueError("a migration needs two different replicas")

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class ReplicaStats:
    """The engine counters a replica reports (engine.api.EngineStats's fields, same names and meaning)."""

    num_running: int = 0
    num_waiting: int = 0
    num_swapped: int = 0
    kv_chunks_used: int = 0
    kv_chunks_free: int = 0
    num_preemptions: int = 0  # cumulative
    kv_usage: float = 0.0
    num_prefix_cache_hits: int = 0
    num_prefix_cache_queries: int = 0
    kv_chunks_cached: int = 0

    @classmethod
    def of(cls, stats: Any) -> ReplicaStats:
        """From an EngineStats (or anything with these attributes)."""
        return cls(**{f.name: getattr(stats, f.name) for f in fields(cls)})


@dataclass(frozen=True)
class DropStatus:
    """What a replica that can drop parameters reports (deployments/cluster/drop_coordinator.py)."""

    model: str
    num_layers: int
    chunks_per_layer: int  # device chunks one layer's weights take
    state: str = "normal"  # normal | dropping | dropped | restoring
    peer: str | None = None  # its partner while not normal
    dropped_layers: int = 0
    ttft_growth: float = 1.0  # recent TTFT / baseline TTFT
    # what KV could ever hold here (the budget less the weights and one full step's workspace: what the
    # scheduler admits against; LLMEngine.kv_capacity_chunks); 0: unknown, the plan takes used + free
    kv_capacity_chunks: int = 0
    # the KV its clients' live requests hold at their last possible tokens, counted from their arrival
    # (AsyncEngine.peak_tokens): demand the engine thread has not seen yet (its stats lag a step)
    client_peak_chunks: int = 0
    store: tuple[str, int] | None = None  # (host, port) of its store, where the pairs it leads meet


@dataclass(frozen=True)
class PairRendezvous:
    """Where a new pair's two replicas meet: the leader's store (`DropStatus.store`) and the pair's own key
    prefix in it. Both sides get it in their drop orders and join at once, each on its own reply."""

    host: str
    port: int
    name: str


@dataclass(frozen=True)
class LayerOrder:
    """Drop: this replica forms a pair with `peer`; the leader keeps layers [0, first_keeps), the follower
    [second_from, num_layers). Grow (to the leader of a formed pair): both drop more, to keep those.
    Restore: the pair dissolves (`peer` None: the peer is gone, restore alone)."""

    action: str  # "drop" | "grow" | "restore"
    role: str  # "leader" | "follower"
    peer: str | None
    first_keeps: int = 0
    second_from: int = 0
    rendezvous: PairRendezvous | None = None  # a drop's: where the two replicas form their pair's group

    def __post_init__(self) -> None:
        if self.action not in ("drop", "grow", "restore") or self.role not in ("leader", "follower"):
            raise ValueError(f"bad layer order {self.action!r} / {self.role!r}")


@dataclass(frozen=True)
class ReplicaReport:
    stats: ReplicaStats
    pools: tuple[Mapping[str, Any], ...] = ()  # PoolTelemetry.to_dict() per tensor-parallel rank (shown as is)
    load: ReplicaLoad | None = None  # None: this replica does not take part in migration
    migrating: tuple[str, ...] = ()  # delivered orders it is still running
    migration: Mapping[str, float] = field(default_factory=dict)  # cumulative counters (MigrationStats)
    dropping: DropStatus | None = None  # None: this replica cannot drop parameters


@dataclass(frozen=True)
class ControllerReply:
    orders: tuple[MigrationOrder, ...] = ()
    is_draining: bool = False
    shutdown_at: float | None = None  # time.time() by which the replica must have drained (app shutdown)
    layer_orders: tuple[LayerOrder, ...] = ()  # KunServe: form or dissolve a cooperative pair


def replica_load(replica_id: str, stats: Any, loads: Any, started_at: float,
                 busy: frozenset[str] | set[str] = frozenset(), host: HostRoom | None = None) -> ReplicaLoad:
    """A replica's `ReplicaLoad` from its EngineStats, `engine.migration.request_loads(engine)` and
    `engine.migration.host_room(engine)`; requests in `busy` (already migrating) are not migratable. The live
    replica and the simulated one both build it here."""
    requests = tuple(RequestLoad(load.request_id, load.num_tokens, load.num_remaining, load.kv_chunks,
                                 load.is_migratable and load.request_id not in busy, load.status,
                                 tuple(load.host_splits)) for load in loads)
    waiting = sum(load.kv_chunks for load in loads if load.status in ("waiting", "swapped"))
    growth = sum(max(0, load.peak_chunks - load.kv_chunks) for load in loads)
    return ReplicaLoad(replica_id, stats.kv_chunks_used + stats.kv_chunks_free, stats.kv_chunks_used, waiting,
                       requests, started_at, host, growth)
