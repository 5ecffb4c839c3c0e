"""KV-headroom request router for LLMServer (configured through `request_router_config` in the YAML).

Serve pickles this module by value into every proxy and handle, so it imports nothing from the project
and stays small. Replicas publish `{kv_free_chunks, kv_usage, num_running, num_waiting, timestamp}` from
`record_routing_stats`. Ranking, best group first (Serve sends to the shortest queue inside a group and
spills to the next group when every replica of a group is at `max_ongoing_requests`):
  1. fresh replicas with no waiting queue whose KV headroom is within `headroom_tolerance` of the best;
  2. the other fresh replicas, one per group, by (waiting queue, less headroom);
  3. replicas whose stats are missing or older than `stats_max_age_s`, together.
With no fresh stats at all it is power of two choices on queue length, like Serve's default router.
Stats are `{}` for a moment after a replica starts, and a replica whose `record_routing_stats` fails keeps
its last value with no flag: hence the timestamp. A replica being drained by the packing policy
(`is_draining` in its stats) gets new requests only when no other replica can take them.

Replica-to-replica calls (live migration) name their destination with the keyword argument
`target_replica=<replica id>`: such a request goes to that replica and no other. For that the router matches
each routed replica to its own request (Serve's default), not FIFO (`FIFOMixin` would hand the replica chosen
for one request to the oldest pending one, which may target another replica).

`pin_to_one_replica=True` (request_router_kwargs) sends every new request to the replica with the lowest id
while it has room: a deliberately skewed load for migration tests and benchmarks.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

REQUIRED_KEYS = ("kv_free_chunks", "num_waiting", "timestamp")
TARGET_KWARG = "target_replica"  # deployments/migration/transport.py sets it


def is_fresh(stats: dict[str, Any] | None, now: float, max_age_s: float) -> bool:
    if not stats or any(key not in stats for key in REQUIRED_KEYS):
        return False
    return now - float(stats["timestamp"]) <= max_age_s


def rank_by_headroom(replicas: Sequence[Any], now: float, max_age_s: float = 2.0,
                     headroom_tolerance: float = 0.1) -> list[list[Any]]:
    """Ranked groups of `replicas` (objects with `.routing_stats`), best first; see the module doc."""
    fresh = [replica for replica in replicas if is_fresh(replica.routing_stats, now, max_age_s)]
    stale = [replica for replica in replicas if not is_fresh(replica.routing_stats, now, max_age_s)]
    if not fresh:
        return [random.sample(stale, min(2, len(stale)))] if stale else []
    not_waiting = [replica for replica in fresh if replica.routing_stats["num_waiting"] == 0]
    best_headroom = max((replica.routing_stats["kv_free_chunks"] for replica in not_waiting), default=None)
    top: list[Any] = []
    if best_headroom is not None:
        threshold = best_headroom * (1.0 - headroom_tolerance)
        top = [replica for replica in not_waiting if replica.routing_stats["kv_free_chunks"] >= threshold]
    rest = sorted((replica for replica in fresh if replica not in top),
                  key=lambda replica: (replica.routing_stats["num_waiting"],
                                       -replica.routing_stats["kv_free_chunks"]))
    random.shuffle(top)  # Serve takes the first of equal queue lengths: do not always favour one replica
    groups = [top] if top else []
    groups.extend([replica] for replica in rest)
    if stale:
        groups.append(stale)
    return _draining_last(groups)


def _draining_last(groups: list[list[Any]]) -> list[list[Any]]:
    def draining(replica) -> bool:
        return bool((replica.routing_stats or {}).get("is_draining"))

    kept = [[replica for replica in group if not draining(replica)] for group in groups]
    drained = [replica for group in groups for replica in group if draining(replica)]
    return [group for group in kept if group] + ([drained] if drained else [])


def replica_key(replica: Any) -> str:
    return getattr(replica.replica_id, "unique_id", str(replica.replica_id))


def route(replicas: Sequence[Any], kwargs: dict[str, Any] | None, now: float, max_age_s: float = 2.0,
          headroom_tolerance: float = 0.1, pin_to_one_replica: bool = False) -> list[list[Any]]:
    """The ranked groups for one request: its target replica alone if it names one (none while that replica
    is not a candidate: Serve retries), else by headroom (or pinned)."""
    target = (kwargs or {}).get(TARGET_KWARG)
    if target is not None:
        return [[replica for replica in replicas if replica_key(replica) == target]]
    if pin_to_one_replica and replicas:
        ordered = sorted(replicas, key=replica_key)
        return [[replica] for replica in ordered]
    return rank_by_headroom(replicas, now, max_age_s, headroom_tolerance)


class KVHeadroomRouter(RequestRouter):
    def initialize_state(self, stats_max_age_s: float = 2.0, headroom_tolerance: float = 0.1,
                         pin_to_one_replica: bool = False, **_: Any):
        self.stats_max_age_s = float(stats_max_age_s)
        self.headroom_tolerance = float(headroom_tolerance)
        self.pin_to_one_replica = bool(pin_to_one_replica)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else None
        return route(candidate_replicas, kwargs, time.time(), getattr(self, "stats_max_age_s", 2.0),
                     getattr(self, "headroom_tolerance", 0.1), getattr(self, "pin_to_one_replica", False))
