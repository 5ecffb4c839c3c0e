"""KV-headroom request router for LLMServer (configured through `request_router_config` in the YAML).

Serve pickles this module by value into every proxy and handle, so it stays small and imports only the
pure ranking (deployments/cluster/ranking.py, which the simulator runs too) and the typed stats record
(deployments/telemetry.py); both are imported by reference, from the installed project.

Replica-to-replica calls (live migration) name their destination with `target_replica=<replica id>`. For
that the router matches each routed replica to its own request (Serve's default), not FIFO (`FIFOMixin`
would hand the replica chosen for one request to the oldest pending one, which may target another replica).
"""

from __future__ import annotations

import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from deployments.cluster.ranking import (  # noqa: F401 - re-exported
    STATS_MAX_AGE_S,
    TARGET_KWARG,
    is_fresh,
    rank_by_headroom,
    replica_key,
    route,
    serve_stats,
)


class KVHeadroomRouter(RequestRouter):
    def initialize_state(self, stats_max_age_s: float = STATS_MAX_AGE_S, headroom_tolerance: float = 0.1,
                         pin_to_one_replica: bool = False, **_: Any):
        self.stats_max_age_s = float(stats_max_age_s)
        self.headroom_tolerance = float(headroom_tolerance)
        self.pin_to_one_replica = bool(pin_to_one_replica)

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else None
        groups = route(candidate_replicas, kwargs, time.time(), getattr(self, "stats_max_age_s", STATS_MAX_AGE_S),
                       getattr(self, "headroom_tolerance", 0.1), getattr(self, "pin_to_one_replica", False),
                       routed_since=self._routed_since)
        if groups and len(groups[0]) == 1 and pending_request is not None:
            self._remember(groups[0][0], pending_request)
        return groups

    def _remember(self, replica: RunningReplica, pending_request: PendingRequest) -> None:
        """A request whose best group is one replica goes there (a group of several: Serve picks by queue
        length, which it counts itself). Counted when chosen, not when sent: a burst's requests are all chosen
        before the first is sent. Keyed by the request, so a retried choice counts once."""
        now = time.time()
        sent = self.__dict__.setdefault("_sent", {}).setdefault(replica_key(replica), {})
        for old in [request_id for request_id, when in sent.items() if when < now - STATS_MAX_AGE_S]:
            del sent[old]  # a replica whose stats never came (starting, gone) keeps no more than this
        request_id = getattr(pending_request.metadata, "internal_request_id", None) or id(pending_request)
        sent.setdefault(request_id, now)

    def _routed_since(self, replica: RunningReplica) -> int:
        """Requests this router sent to `replica` after its routing stats were taken (older ones are dropped)."""
        sent = self.__dict__.get("_sent", {}).get(replica_key(replica))
        stats = serve_stats(replica)
        if not sent or stats is None:
            return 0
        for request_id in [request_id for request_id, when in sent.items() if when <= stats.timestamp]:
            del sent[request_id]
        return len(sent)
