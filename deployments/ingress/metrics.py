"""Prometheus metrics of one replica, named like vLLM's `vllm:*` with the `elastic:` prefix.

Request metrics (latencies, token counts, finished requests) are recorded by the HTTP layer as outputs
stream out. Engine and pool state (queue lengths, KV usage, balloon sizes, cumulative engine counters) is
read from `engine.stats()` / `engine.memory_telemetry()` at scrape time by a collector, so nothing polls
the engine between scrapes. Each app gets its own registry: two apps in one process (tests) never clash.
Every series carries `model_name` and `replica`, because the Serve proxy sends each scrape to one
replica of many.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from engine.api import EngineClient, EngineStats

logger = logging.getLogger(__name__)

PREFIX = "elastic:"
DROP_STATES = ("normal", "dropping", "dropped", "restoring")
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                       0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


class EngineStateCollector(Collector):
    """Gauges and cumulative counters taken from the engine when Prometheus scrapes: per served model (the
    `model_name` label) from that model's stats; the pool's series once, labelled with every model's name
    joined by '+' (several models of one replica share one pool)."""

    def __init__(self, engine_provider: Callable[[], EngineClient | None], labels: dict[str, str],
                 served_models: Callable[[], dict[str, str]] | None = None):
        self._engine_provider = engine_provider
        self._labels = labels
        self._served_models = served_models  # the name clients send -> the engine's model name

    def _family(self, kind, name: str, documentation: str, extra_labels: tuple[str, ...] = ()):
        return kind(PREFIX + name, documentation, labels=(*self._labels, *extra_labels))

    def collect(self) -> Iterator:
        try:
            engine = self._engine_provider()
            models = (self._served_models() if self._served_models is not None
                      else {self._labels["model_name"]: engine.model_name})
            per_model = [([served, self._labels["replica"]], engine.for_model(name).stats())
                         for served, name in models.items()]
            telemetry = engine.memory_telemetry()
        except Exception:  # a scrape must never fail because the engine is starting or gone
            logger.debug("engine state unavailable for metrics", exc_info=True)
            return
        yield from self._model_families(per_model)
        yield from self._pool_families(["+".join(models), self._labels["replica"]], telemetry)

    def _model_families(self, per_model: list[tuple[list[str], EngineStats]]) -> Iterator:
        gauges = [
            ("num_requests_running", "Requests in the running batch.", lambda s: s.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", lambda s: s.num_waiting),
            ("num_requests_swapped", "Preempted requests whose KV is in the host buffer.", lambda s: s.num_swapped),
            ("kv_cache_usage_perc", "KV cache usage in [0, 1] (used / (used + free)).", lambda s: s.kv_usage),
            ("kv_cache_used_chunks", "Pool chunks the KV cache holds.", lambda s: s.kv_chunks_used),
            ("kv_cache_free_chunks", "Chunks the KV cache could still get.", lambda s: s.kv_chunks_free),
            ("kv_offloaded_layers", "(request, layer) pairs whose KV pages are in the host buffer (LayerKV).",
             lambda s: s.kv_offloaded_layers),
            ("kv_offloaded_host_bytes", "Host-buffer bytes held by offloaded layers.", lambda s: s.kv_host_bytes),
            ("kv_fetched_bytes_last_step", "Bytes the last step staged from the host for offloaded layers.",
             lambda s: s.kv_bytes_fetched_last_step),
            ("slo_attainment", "Finished requests that met their class's TTFT and TPOT targets, in [0, 1].",
             lambda s: s.slo_attained / s.slo_finished if s.slo_finished else 1.0),
            ("weights_dropped_bytes", "Weight bytes given back to the pool (KunServe parameter dropping).",
             lambda s: s.dropped_weight_bytes),
            ("pipeline_bubble_ratio", "Idle share of the two stages' time in cooperative pipeline steps.",
             lambda s: s.pipeline_bubble_ratio),
        ]
        counters = [
            ("num_preemptions", "Preemptions (swap or recompute).", lambda s: s.num_preemptions),
            ("prefix_cache_hits", "Prompt tokens served from the prefix cache.", lambda s: s.num_prefix_cache_hits),
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             lambda s: s.num_prefix_cache_queries),
            ("kv_fetched_bytes", "Bytes staged from the host for offloaded layers.", lambda s: s.kv_bytes_fetched),
            ("slo_attained", "Finished requests that met their SLO class targets.", lambda s: s.slo_attained),
            ("slo_finished", "Finished requests counted for SLO attainment.", lambda s: s.slo_finished),
        ]
        for kind, metrics in ((GaugeMetricFamily, gauges), (CounterMetricFamily, counters)):
            for name, documentation, value in metrics:
                family = self._family(kind, name, documentation)
                for base, stats in per_model:
                    family.add_metric(base, value(stats))
                yield family
        state = self._family(GaugeMetricFamily, "parameter_drop_state",
                             "1 for the replica's parameter-dropping state, 0 for the others.", ("state",))
        kinds = self._family(GaugeMetricFamily, "kv_kind_bytes", "Per KV kind of the LCM allocator (paged layout): "
                             "bytes its large pages hold, bytes in use, free small pages inside them.",
                             ("kind", "state"))
        for base, stats in per_model:
            for name in DROP_STATES:
                state.add_metric([*base, name], float(stats.drop_state == name))
            for kind in stats.kv_kinds:
                for what, value in (("held", kind.bytes_held), ("used", kind.bytes_used),
                                    ("fragmentation", kind.internal_fragmentation_bytes)):
                    kinds.add_metric([*base, kind.kind, what], value)
        yield state
        yield kinds

    def _pool_families(self, base: list[str], telemetry: list[dict[str, Any]]) -> Iterator:
        chunks = self._family(GaugeMetricFamily, "pool_chunks", "Pool chunks per balloon (and free).",
                              ("rank", "client"))
        chunk_bytes = self._family(GaugeMetricFamily, "pool_chunk_bytes", "Bytes per pool chunk.", ("rank",))
        host_used = self._family(GaugeMetricFamily, "pool_host_buffer_bytes",
                                 "Host buffer bytes in use (offloaded KV, parked weights).", ("rank",))
        host_capacity = self._family(GaugeMetricFamily, "pool_host_buffer_capacity_bytes",
                                     "Host buffer capacity.", ("rank",))
        inflates = self._family(CounterMetricFamily, "pool_inflate", "Balloon inflations.", ("rank",))
        deflates = self._family(CounterMetricFamily, "pool_deflate", "Balloon deflations.", ("rank",))
        reclaims = self._family(CounterMetricFamily, "pool_reclaim",
                                "Times the pool took chunks back from a balloon for another.", ("rank",))
        exhausted = self._family(CounterMetricFamily, "pool_exhausted", "Inflations refused.", ("rank",))
        swapped = self._family(CounterMetricFamily, "pool_bytes_swapped",
                               "Bytes moved between device pool and host buffer.", ("rank", "direction"))
        for rank, snapshot in enumerate(telemetry):
            labels = [*base, str(rank)]
            for client, count in snapshot.get("chunks_per_client", {}).items():
                chunks.add_metric([*labels, client], count)
            chunks.add_metric([*labels, "free"], snapshot.get("num_free_chunks", 0))
            chunk_bytes.add_metric(labels, snapshot.get("chunk_bytes", 0))
            host_used.add_metric(labels, snapshot.get("host_buffer_used_bytes", 0))
            host_capacity.add_metric(labels, snapshot.get("host_buffer_capacity_bytes", 0))
            inflates.add_metric(labels, snapshot.get("num_inflates", 0))
            deflates.add_metric(labels, snapshot.get("num_deflates", 0))
            reclaims.add_metric(labels, snapshot.get("num_reclaims", 0))
            exhausted.add_metric(labels, snapshot.get("num_exhausted", 0))
            swapped.add_metric([*labels, "out"], snapshot.get("bytes_swapped_out", 0))
            swapped.add_metric([*labels, "in"], snapshot.get("bytes_swapped_in", 0))
        yield from (chunks, chunk_bytes, host_used, host_capacity, inflates, deflates, reclaims, exhausted,
                    swapped)


class MigrationCollector(Collector):
    """`elastic:migrations_*` from this replica's migration counters (deployments/migration/source.py), at scrape."""

    def __init__(self, stats_provider: Callable[[], dict[str, Any]], labels: dict[str, str]):
        self._stats_provider = stats_provider
        self._labels = labels

    def collect(self) -> Iterator:
        stats = self._stats_provider()
        base = list(self._labels.values())
        names = tuple(self._labels)

        def counter(name: str, documentation: str, value: float, extra: dict[str, str] | None = None):
            family = CounterMetricFamily(PREFIX + name, documentation, labels=(*names, *(extra or {})))
            family.add_metric([*base, *(extra or {}).values()], value)
            return family

        yield counter("migrations_started", "Migrations this replica started as the source.", stats["started"])
        committed = CounterMetricFamily(PREFIX + "migrations_committed",
                                        "Migrations from this replica that committed, by copy or recompute.",
                                        labels=(*names, "mode"))
        for mode in ("copy", "recompute"):
            committed.add_metric([*base, mode], stats[mode])
        yield committed
        aborted = CounterMetricFamily(PREFIX + "migrations_aborted", "Migrations from this replica rolled back.",
                                      labels=(*names, "reason"))
        for reason, count in sorted(stats["aborted_by_reason"].items()):
            aborted.add_metric([*base, reason], count)
        yield aborted
        yield counter("migrations_adopted", "Migrated requests this replica took over.", stats["adopted"])
        yield counter("migrations_incoming_refused", "Reservations refused (no room).", stats["incoming_refused"])
        yield counter("migrations_orphans_finished", "Adopted requests finished here after their source went away.",
                      stats["orphans_finished"])
        yield counter("migrations_bytes", "KV bytes sent to other replicas.", stats["bytes_moved"])
        yield counter("migrations_stages", "KV copies sent (stages, the tail included).", stats["stages"])
        downtime = SummaryMetricFamily(PREFIX + "migration_downtime_seconds",
                                       "Client-visible pause per migration: the source's last token to the "
                                       "destination's first.", labels=names)
        downtime.add_metric(base, count_value=stats["downtime_count"], sum_value=stats["downtime_sum_s"])
        yield downtime


class ServingMetrics:
    """All metrics of one app, in its own registry."""

    def __init__(self, engine_provider: Callable[[], EngineClient | None], model_name: str, replica_id: str,
                 migration_stats: Callable[[], dict[str, Any]] | None = None,
                 served_models: Callable[[], dict[str, str]] | None = None):
        """`model_name`: the default model's served name; `served_models`: every served name -> the engine's
        model name (None: the default model only)."""
        self.registry = CollectorRegistry(auto_describe=True)
        self._labels = {"model_name": model_name, "replica": replica_id}
        names = tuple(self._labels)
        registry = self.registry

        def counter(name, documentation, extra=()):
            return Counter(PREFIX + name, documentation, (*names, *extra), registry=registry)

        def histogram(name, documentation, buckets):
            return Histogram(PREFIX + name, documentation, names, buckets=buckets, registry=registry)

        self.request_success = counter("request_success", "Finished engine requests by finish reason.",
                                       ("finished_reason",))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished engine requests.")
        self.generation_tokens = counter("generation_tokens", "Generated tokens.")
        self.http_errors = counter("http_request_errors", "Requests answered with an error, by status.",
                                   ("status",))
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Arrival to first token.",
                                             TTFT_BUCKETS)
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output tokens.",
                                             INTER_TOKEN_BUCKETS)
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Arrival to last token.",
                                             E2E_BUCKETS)
        # time to first token in two (vLLM's names): waiting for admission, then prefilling to the first token
        self.request_queue_time = histogram("request_queue_time_seconds",
                                            "Arrival at the engine to its first prompt chunk scheduled.", TTFT_BUCKETS)
        self.request_prefill_time = histogram("request_prefill_time_seconds",
                                              "First prompt chunk scheduled to the first token.", TTFT_BUCKETS)
        self.registry.register(EngineStateCollector(engine_provider, self._labels, served_models))
        if migration_stats is not None:
            self.registry.register(MigrationCollector(migration_stats, self._labels))

    def labels(self, metric, **extra):
        """`metric` with this app's labels; `model_name` in `extra` overrides the default model's name."""
        return metric.labels(**{**self._labels, **extra})

    def record_error(self, status: int) -> None:
        self.labels(self.http_errors, status=str(status)).inc()

    def record_finished(self, finished_reason: str, num_prompt_tokens: int, **model) -> None:
        self.labels(self.request_success, finished_reason=finished_reason, **model).inc()
        self.labels(self.prompt_tokens, **model).inc(num_prompt_tokens)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latency bookkeeping of one engine request; observes into `ServingMetrics` as tokens arrive."""

    def __init__(self, metrics: ServingMetrics, arrival_time: float, model_name: str | None = None):
        self._metrics = metrics
        self._model = {} if model_name is None else {"model_name": model_name}
        self._arrival_time = arrival_time
        self._last_token_time: float | None = None
        self.is_finished = False

    @property
    def last_token_time(self) -> float | None:
        return self._last_token_time

    def on_tokens(self, num_new_tokens: int, now: float) -> None:
        if num_new_tokens <= 0:
            return
        metrics = self._metrics
        if self._last_token_time is None:
            metrics.labels(metrics.time_to_first_token, **self._model).observe(now - self._arrival_time)
        else:
            # Tokens that arrive together (multi-token steps) share the gap evenly.
            gap = (now - self._last_token_time) / num_new_tokens
            inter_token = metrics.labels(metrics.inter_token_latency, **self._model)
            for _ in range(num_new_tokens):
                inter_token.observe(gap)
        metrics.labels(metrics.generation_tokens, **self._model).inc(num_new_tokens)
        self._last_token_time = now

    def on_first_token_times(self, queue_time_s: float, prefill_time_s: float) -> None:
        """The engine's split of the first token's time (RequestOutput.queue_time_s / prefill_time_s)."""
        self._metrics.labels(self._metrics.request_queue_time, **self._model).observe(queue_time_s)
        self._metrics.labels(self._metrics.request_prefill_time, **self._model).observe(prefill_time_s)

    def on_finished(self, finished_reason: str, num_prompt_tokens: int, now: float) -> None:
        if self.is_finished:
            return
        self.is_finished = True
        self._metrics.record_finished(finished_reason, num_prompt_tokens, **self._model)
        self._metrics.labels(self._metrics.e2e_request_latency, **self._model).observe(now - self._arrival_time)
