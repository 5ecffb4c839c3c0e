"""Reading a running Serve app from the outside: the cluster view and per-replica /metrics."""

from __future__ import annotations

import time
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

PER_REPLICA_LABELS = ("model_name", "replica")


def wait_for(condition, what: str, timeout_s: float = 30.0, interval_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def cluster_view(base_url: str) -> dict:
    response = httpx.get(f"{base_url}/v1/cluster", timeout=10)
    response.raise_for_status()
    return response.json()


def wait_for_fresh_replicas(base_url: str, num_replicas: int, timeout_s: float = 60.0) -> dict:
    def ready():
        view = cluster_view(base_url)
        fresh = [entry for entry in view["replicas"].values() if not entry["is_stale"]]
        return view if len(fresh) == num_replicas and view["num_replicas"] == num_replicas else None
    return wait_for(ready, f"{num_replicas} replicas reporting to the controller", timeout_s)


def scrape(base_url: str) -> tuple[str, dict[tuple, float]]:
    """One /metrics answer: (replica id, {(sample name, other labels): value})."""
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    response.raise_for_status()
    replica = None
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            replica = sample.labels.get("replica", replica)
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in PER_REPLICA_LABELS))
            samples[(sample.name, labels)] = sample.value
    return replica, samples


def metrics_by_replica(base_url: str, num_replicas: int, timeout_s: float = 30.0) -> dict[str, dict]:
    """{replica id: samples}; the proxy sends each scrape to one replica, so scrape until all answered. The
    KV-headroom router sends a scrape where its copy of the replicas' stats shows the most headroom, and that copy
    lags the replicas by seconds (Serve's controller pulls and forwards it): right after a load ends every scrape
    may go to one replica until the copy shows both idle, so this scrapes for up to `timeout_s`, not a count."""
    by_replica = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        replica, samples = scrape(base_url)
        by_replica.setdefault(replica, samples)
        if len(by_replica) == num_replicas:
            break
        time.sleep(0.05)
    assert len(by_replica) == num_replicas, f"only saw replicas {sorted(by_replica)} in {timeout_s} s"
    return by_replica


def metric_totals(base_url: str, num_replicas: int) -> dict[tuple, float]:
    totals: dict[tuple, float] = defaultdict(float)
    for samples in metrics_by_replica(base_url, num_replicas).values():
        for key, value in samples.items():
            totals[key] += value
    return dict(totals)
