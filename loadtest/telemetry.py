"""Watching the server during a run: every replica's pools and /metrics sampled every second, and parsing.

Pools come from /v1/cluster (the controller's view: every replica, one memory row each); a server without it
is asked /v1/memory instead (which the router answers from one replica). The sampler is a thread of the
runner (never of the Locust process, whose timing it would disturb). Peers such as vLLM have neither: a
404 stops that half of the sampling, and everything downstream treats missing keys as absent, not zero.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import requests

# Families kept from /metrics: the server's own (elastic:, vllm:), not the Python process collectors.
METRIC_PREFIXES = ("elastic:", "vllm:")

_SAMPLE_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")


def parse_prometheus(text: str, prefixes: Iterable[str] = METRIC_PREFIXES) -> dict[str, float]:
    """`name{labels}` -> value for the samples whose name starts with one of `prefixes`."""
    prefixes = tuple(prefixes)
    values: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE_LINE.match(line)
        if match is None:
            continue
        name, labels, raw = match.groups()
        if prefixes and not name.startswith(prefixes):
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        values[name + (labels or "")] = value
    return values


def metric_total(values: dict[str, float], suffix: str) -> float | None:
    """Sum over labels of the samples named `<prefix>suffix` for any prefix (so ours and vLLM's both match)."""
    matched = [value for key, value in values.items() if key.split("{", 1)[0].split(":", 1)[-1] == suffix]
    return sum(matched) if matched else None


@dataclass(frozen=True)
class MemoryPoint:
    """One replica's pool at one time, bytes summed over its ranks (each rank holds its own shard)."""

    time: float
    replica: str
    num_ranks: int
    client_bytes: dict[str, float]  # "kv", "activations", "weights", ... as the pool names its balloons
    free_bytes: float | None
    host_bytes: float | None


def memory_point(time_s: float, body: dict) -> MemoryPoint | None:
    """A /v1/memory answer -> a point; None when it has none of the pool keys."""
    if not isinstance(body, dict):
        return None
    ranks = body.get("ranks")
    if not isinstance(ranks, list):
        ranks = [body] if "chunks_per_client" in body else []
    clients: dict[str, float] = {}
    free = host = None
    num_ranks = 0
    for rank in ranks:
        if not isinstance(rank, dict):
            continue
        num_ranks += 1
        chunk_bytes = _number(rank.get("chunk_bytes"))
        per_client = rank.get("chunks_per_client")
        if isinstance(per_client, dict) and chunk_bytes is not None:
            for client, num_chunks in per_client.items():
                value = _number(num_chunks)
                if value is not None:
                    clients[client] = clients.get(client, 0.0) + value * chunk_bytes
        num_free = _number(rank.get("num_free_chunks"))
        if num_free is not None and chunk_bytes is not None:
            free = (free or 0.0) + num_free * chunk_bytes
        host_used = _number(rank.get("host_buffer_used_bytes"))
        if host_used is not None:
            host = (host or 0.0) + host_used
    if not clients and free is None and host is None:
        return None
    return MemoryPoint(
        time=time_s,
        replica=str(body.get("replica", "replica")),
        num_ranks=num_ranks,
        client_bytes=clients,
        free_bytes=free,
        host_bytes=host,
    )


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # the last line of a file cut off mid-write
    return rows


def read_memory_points(path: Path) -> list[MemoryPoint]:
    points = []
    for row in read_jsonl(path):
        if row.get("status") == 200:
            point = memory_point(row["time"], row.get("body"))
            if point is not None:
                points.append(point)
    return points


class TelemetrySampler(threading.Thread):
    """Appends one line per second to memory.jsonl and metrics.jsonl in `out_dir` until `stop()`."""

    def __init__(self, base_url: str, out_dir: Path, interval_s: float = 1.0, timeout_s: float = 2.0) -> None:
        super().__init__(name="telemetry-sampler", daemon=True)
        self.base_url = base_url.rstrip("/")
        self.out_dir = Path(out_dir)
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._stop_event = threading.Event()
        self.has_memory_endpoint = True
        self.has_cluster_endpoint = True
        self.num_samples = 0

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=self.timeout_s * 2 + self.interval_s + 1)

    def run(self) -> None:
        session = requests.Session()
        with (
            open(self.out_dir / "memory.jsonl", "a", encoding="utf-8") as memory_file,
            open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as metrics_file,
        ):
            next_at = time.monotonic()
            while not self._stop_event.is_set():
                if self.has_memory_endpoint:
                    self._sample_memory(session, memory_file)
                self._sample_metrics(session, metrics_file)
                self.num_samples += 1
                next_at += self.interval_s
                self._stop_event.wait(max(0.0, next_at - time.monotonic()))

    def _sample_memory(self, session: requests.Session, out) -> None:
        if self.has_cluster_endpoint and self._sample_cluster(session, out):
            return
        now = time.time()
        try:
            response = session.get(self.base_url + "/v1/memory", timeout=self.timeout_s)
        except requests.RequestException as error:
            out.write(json.dumps({"time": now, "status": None, "error": str(error)[:200]}) + "\n")
            return
        if response.status_code in (404, 405):
            self.has_memory_endpoint = False  # a peer without pool telemetry: stop asking
        try:
            body = response.json()
        except ValueError:
            body = None
        out.write(json.dumps({"time": now, "status": response.status_code, "body": body}) + "\n")
        out.flush()

    def _sample_cluster(self, session: requests.Session, out) -> bool:
        """One memory row per fresh replica from /v1/cluster; False when the server has no such view."""
        now = time.time()
        try:
            response = session.get(self.base_url + "/v1/cluster", timeout=self.timeout_s)
            body = response.json()
        except (requests.RequestException, ValueError):
            return False
        if response.status_code in (404, 405):
            self.has_cluster_endpoint = False
        if response.status_code != 200 or not isinstance(body, dict) or not isinstance(body.get("replicas"), dict):
            return False
        for replica, entry in sorted(body["replicas"].items()):
            if isinstance(entry, dict) and not entry.get("is_stale"):
                row = {"replica": replica, "ranks": entry.get("pools") or []}
                out.write(json.dumps({"time": now, "status": 200, "body": row}) + "\n")
        out.flush()
        return True

    def _sample_metrics(self, session: requests.Session, out) -> None:
        now = time.time()
        try:
            response = session.get(self.base_url + "/metrics", timeout=self.timeout_s)
        except requests.RequestException as error:
            out.write(json.dumps({"time": now, "status": None, "error": str(error)[:200]}) + "\n")
            return
        values = parse_prometheus(response.text) if response.status_code == 200 else {}
        out.write(json.dumps({"time": now, "status": response.status_code, "values": values}) + "\n")
        out.flush()
