"""The KV-headroom ranking of replicas for one request (pure Python; KVHeadroomRouter and the simulator run it).

Replicas publish `RoutingStats` (deployments/telemetry.py). Ranking, best group first (Serve sends to the
shortest queue inside a group and spills to the next group when every replica of a group is at
`max_ongoing_requests`):
  1. fresh replicas with no waiting queue whose KV headroom is within `headroom_tolerance` of the best;
  2. the other fresh replicas, one per group, by (waiting queue, less headroom);
  3. replicas whose stats are missing or older than `stats_max_age_s`, together.
With no fresh stats at all it is power of two choices on queue length, like Serve's default router.
Stats are up to `request_routing_stats_period_s` (0.5 s) old, and a burst inside that time would all see the
same best replica (measured: 24 requests of a Locust spike on one of two replicas, docs/KUNSERVE.md). So a
replica's headroom is lowered by the requests this router chose it for since its stats were taken (`routed_since`),
each counted as that replica's mean KV per running request: the burst spreads as soon as the best replica's
headroom falls within the tolerance of the next. An idle replica has no such mean and is not lowered (another
replica's requests say nothing of the new ones: one long prompt there would send small requests away).
Stats are missing for a moment after a replica starts, and a replica whose `record_routing_stats` fails keeps
its last value with no flag: hence the timestamp. A replica being drained by the packing policy
(`is_draining`) gets new requests only when no other replica can take them, and one whose engine stopped
(`is_stopped`) after that.

Replica-to-replica calls (live migration) name their destination with the keyword argument
`target_replica=<replica id>`: such a request goes to that replica and no other. `pin_to_one_replica=True`
sends every new request to the replica with the lowest id while it has room: a deliberately skewed load for
migration tests and benchmarks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from deployments.telemetry import RoutingStats

TARGET_KWARG = "target_replica"  # deployments/migration/transport.py sets it
# Stats older than this rank a replica as unknown. Serve's controller pulls them every ~0.5 s and hands them to the
# routers by long poll; on a small box whose engine threads run at nice -10 (EngineConfig.engine_thread_nice) the
# controller, at nice 0, can lag (the likely cause of a fresh-clone CI run routing a probe to the fuller replica
# under the former 2 s: the ranking does that only when the emptier one's stats count as stale; not reproduced),
# and a replica judged by 3-s-old stats is better judged than treated as unknown. One that stopped reporting is
# unknown after 5 s.
STATS_MAX_AGE_S = 5.0

R = TypeVar("R")


def serve_stats(replica: Any) -> RoutingStats | None:
    """The typed stats of one of Serve's RunningReplica objects (their `.routing_stats` is a dict)."""
    return RoutingStats.from_dict(replica.routing_stats)


def is_fresh(stats: RoutingStats | None, now: float, max_age_s: float) -> bool:
    return stats is not None and now - stats.timestamp <= max_age_s


def chunks_per_request(stats: RoutingStats) -> float | None:
    """The KV chunks a running request takes on that replica on average (None while nothing runs there)."""
    if stats.num_running <= 0 or not 0.0 < stats.kv_usage < 1.0:
        return None
    return stats.kv_usage * stats.kv_free_chunks / (1.0 - stats.kv_usage) / stats.num_running


def rank_by_headroom(replicas: Sequence[R], now: float, max_age_s: float = STATS_MAX_AGE_S,
                     headroom_tolerance: float = 0.1, stats_of: Callable[[R], RoutingStats | None] = serve_stats,
                     rng: random.Random | None = None, routed_since: Callable[[R], int] | None = None) -> list[list[R]]:
    """Ranked groups of `replicas`, best first; see the module doc. `rng`: the randomness of ties (the
    simulator passes a seeded one); `routed_since(replica)`: requests this router sent there after its stats."""
    rng = rng or random.Random()
    stats = {id(replica): stats_of(replica) for replica in replicas}
    fresh = [replica for replica in replicas if is_fresh(stats[id(replica)], now, max_age_s)]
    stale = [replica for replica in replicas if not is_fresh(stats[id(replica)], now, max_age_s)]
    if not fresh:
        return [rng.sample(stale, min(2, len(stale)))] if stale else []
    headroom = {id(replica): _headroom(stats[id(replica)], routed_since(replica) if routed_since else 0)
                for replica in fresh}
    not_waiting = [replica for replica in fresh if stats[id(replica)].num_waiting == 0]
    best_headroom = max((headroom[id(replica)] for replica in not_waiting), default=None)
    top: list[R] = []
    if best_headroom is not None:
        threshold = best_headroom * (1.0 - headroom_tolerance)
        top = [replica for replica in not_waiting if headroom[id(replica)] >= threshold]
    rest = sorted((replica for replica in fresh if replica not in top),
                  key=lambda replica: (stats[id(replica)].num_waiting, -headroom[id(replica)]))
    rng.shuffle(top)  # Serve takes the first of equal queue lengths: do not always favour one replica
    groups = [top] if top else []
    groups.extend([replica] for replica in rest)
    if stale:
        groups.append(stale)
    held = {id(replica): _held_back(stats[id(replica)]) for replica in replicas}
    kept = [[replica for replica in group if not held[id(replica)]] for group in groups]
    last = [[replica for group in groups for replica in group if held[id(replica)] == rank] for rank in (1, 2)]
    return [group for group in kept if group] + [group for group in last if group]


def _held_back(stats: RoutingStats | None) -> int:
    """0: ranked by its stats; 1: draining (after every other); 2: its engine stopped (after the draining)."""
    if stats is None:
        return 0
    return 2 if stats.is_stopped else 1 if stats.is_draining else 0


def _headroom(stats: RoutingStats, sent: int) -> float:
    """A replica's KV headroom less what the requests sent there since its stats will take (as many as its
    running requests' mean; an idle replica's is not lowered)."""
    each = chunks_per_request(stats)
    if sent <= 0 or each is None:
        return float(stats.kv_free_chunks)
    return max(0.0, stats.kv_free_chunks - sent * each)


def replica_key(replica: Any) -> str:
    return getattr(replica.replica_id, "unique_id", str(replica.replica_id))


def route(replicas: Sequence[R], kwargs: Mapping[str, Any] | None, now: float, max_age_s: float = STATS_MAX_AGE_S,
          headroom_tolerance: float = 0.1, pin_to_one_replica: bool = False,
          stats_of: Callable[[R], RoutingStats | None] = serve_stats,
          key: Callable[[R], str] = replica_key, routed_since: Callable[[R], int] | None = None) -> list[list[R]]:
    """The ranked groups for one request: its target replica alone if it names one (none while that replica
    is not a candidate: Serve retries), else by headroom (or pinned)."""
    target = (kwargs or {}).get(TARGET_KWARG)
    if target is not None:
        return [[replica for replica in replicas if key(replica) == target]]
    if pin_to_one_replica and replicas:
        return [[replica] for replica in sorted(replicas, key=key)]
    return rank_by_headroom(replicas, now, max_age_s, headroom_tolerance, stats_of, routed_since=routed_since)
