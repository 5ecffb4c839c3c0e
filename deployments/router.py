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
its last value with no flag: hence the timestamp.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

REQUIRED_KEYS = ("kv_free_chunks", "num_waiting", "timestamp")


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
    return groups


class KVHeadroomRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, stats_max_age_s: float = 2.0, headroom_tolerance: float = 0.1, **_: Any):
        self.stats_max_age_s = float(stats_max_age_s)
        self.headroom_tolerance = float(headroom_tolerance)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        max_age_s = getattr(self, "stats_max_age_s", 2.0)
        tolerance = getattr(self, "headroom_tolerance", 0.1)
        return rank_by_headroom(candidate_replicas, time.time(), max_age_s, tolerance)
