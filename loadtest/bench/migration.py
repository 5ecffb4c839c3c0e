"""`python -m loadtest.bench.migration`: live KV migration under a skewed load, policy `none` vs `balance`.

Starts Ray on 127.0.0.1 (its own temp dir) with two LLMServer replicas of the embedded SmolLM2 (fp32, one
torch thread, a small pool so KV runs short) whose router pins every new request to one replica: the
skewed load of issue 6. The same workload (long streamed completions arriving every `interval` seconds)
runs once per policy, switched at run time through POST /v1/admin/migration_policy, and the results are
printed side by side: preemptions, p99 TTFT, p99 TPOT, migrations, mean downtime, and how far apart the two
replicas' KV use stayed while they worked. `--json PATH` also writes them as JSON.

`run_policy` is also what tests/deployments/migration/test_migration_balance.py runs (with a smaller workload).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from loadtest.metrics import RequestRecord, Summary, summarize
from loadtest.openai_stream import StreamTimer
from loadtest.text import TextMaker
from loadtest.tokens import WordTokenCounter

REPO = Path(__file__).resolve().parents[1]
API_KEY = "migration-bench"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PINNED_ROUTER = {"request_router_class": "deployments.cluster.router:KVHeadroomRouter",
                 "request_router_kwargs": {"pin_to_one_replica": True}, "request_routing_stats_period_s": 0.5}


@dataclass(frozen=True)
class SkewedWorkload:
    num_requests: int = 8
    prompt_tokens: int = 80
    max_tokens: int = 256
    interval_s: float = 0.5  # between request arrivals
    seed: int = 0

    def prompts(self) -> list[str]:
        maker = TextMaker(WordTokenCounter(), random.Random(self.seed))
        return [maker.text(self.prompt_tokens) for _ in range(self.num_requests)]


def app_args(device_memory: str = "580MiB", controller_name: str = "migration-bench-controller") -> dict:
    """Two replicas, a pool that holds ~1,300 tokens of KV each, every request pinned to one replica."""
    return {"device": "cpu", "dtype": "float32", "device_memory": device_memory, "host_buffer": "256MiB",
            "enable_prefix_caching": False, "max_model_len": 1024, "max_num_batched_tokens": 256,
            "num_threads": 1, "api_key": API_KEY, "controller_name": controller_name, "migration_policy": "none",
            "deployment_options": {"num_replicas": 2, "request_router_config": PINNED_ROUTER}}


# ---- reading the cluster ----------------------------------------------------------------------------------
def cluster_view(base: str) -> dict:
    response = httpx.get(f"{base}/v1/cluster", headers=HEADERS, timeout=10)
    response.raise_for_status()
    return response.json()


def is_idle(view: dict) -> bool:
    return all(not entry["is_stale"] and not entry["stats"]["num_running"] and not entry["stats"]["num_waiting"]
               and not entry["stats"]["num_swapped"] and not entry.get("migrating")
               for entry in view["replicas"].values())


def wait_until_idle(base: str, timeout_s: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        view = cluster_view(base)
        if is_idle(view) and len(view["replicas"]) == 2:
            return view
        if time.monotonic() > deadline:
            raise TimeoutError("the replicas did not become idle")
        time.sleep(0.25)


class ClusterSampler:
    """Samples every replica's KV use from /v1/cluster while a run goes on (a thread)."""

    def __init__(self, base: str, period_s: float = 0.5):
        self._base = base
        self._period_s = period_s
        self._stop = threading.Event()
        self.samples: list[dict] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClusterSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                view = cluster_view(self._base)
                self.samples.append({replica: {"kv_usage": entry["stats"]["kv_usage"], "load": entry.get("kv_load"),
                                               "running": entry["stats"]["num_running"],
                                               "waiting": entry["stats"]["num_waiting"]}
                                     for replica, entry in view["replicas"].items()})
            except httpx.HTTPError:
                pass
            self._stop.wait(self._period_s)

    def mean_kv_gap(self) -> float | None:
        """Mean |KV use difference| between the two replicas over the samples where either was working."""
        gaps = [abs(a["kv_usage"] - b["kv_usage"]) for sample in self.samples if len(sample) == 2
                for a, b in [tuple(sample.values())] if a["running"] + a["waiting"] + b["running"] + b["waiting"]]
        return sum(gaps) / len(gaps) if gaps else None


# ---- one run ---------------------------------------------------------------------------------------------
async def _stream(client: httpx.AsyncClient, base: str, index: int, prompt: str, max_tokens: int) -> RequestRecord:
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start, started = time.time(), time.perf_counter()
    timer = StreamTimer(f"req-{index}", "completions", start, max_tokens)
    try:
        async with client.stream("POST", f"{base}/v1/completions", json=body, headers=HEADERS) as response:
            if response.status_code != 200:
                await response.aread()
                return timer.finish(time.perf_counter() - started, f"HTTP {response.status_code}",
                                    response.status_code)
            async for data in response.aiter_bytes():
                timer.feed(data, time.perf_counter() - started)
    except httpx.HTTPError as exc:
        return timer.finish(time.perf_counter() - started, repr(exc), None)
    return timer.finish(time.perf_counter() - started)


async def run_workload(base: str, workload: SkewedWorkload) -> list[RequestRecord]:
    async with httpx.AsyncClient(timeout=600) as client:
        tasks = []
        for index, prompt in enumerate(workload.prompts()):
            tasks.append(asyncio.ensure_future(_stream(client, base, index, prompt, workload.max_tokens)))
            await asyncio.sleep(workload.interval_s)
        return list(await asyncio.gather(*tasks))


@dataclass
class PolicyResult:
    policy: str
    summary: Summary
    preemptions: dict[str, int]  # per replica, during the run
    loaded_replica: str  # where the pinned router sent every request
    migrations: dict[str, float]  # committed, aborted, copy, recompute, bytes_moved (deltas)
    mean_downtime_ms: float | None
    mean_kv_gap: float | None
    peak_kv_usage: dict[str, float] = field(default_factory=dict)
    bandwidth_bytes_per_s: float = 0.0  # the sources' measured KV transfer rate (0: nothing copied)

    def row(self) -> dict[str, str]:
        def ms(value):
            return "-" if value is None else f"{value:.0f}"

        other = sum(v for replica, v in self.preemptions.items() if replica != self.loaded_replica)
        return {
            "requests ok": f"{self.summary.num_ok}/{self.summary.num_requests}",
            "preemptions (loaded / other)": f"{self.preemptions.get(self.loaded_replica, 0)} / {other}",
            "p99 TTFT ms": ms(self.summary.ttft_ms.p99),
            "p99 TPOT ms": ms(self.summary.tpot_ms.p99),
            "mean TPOT ms": ms(self.summary.tpot_ms.mean),
            "output tok/s": f"{self.summary.output_tokens_per_s:.1f}",
            "migrations (copy / recompute)": f"{self.migrations['committed']:.0f} "
                                             f"({self.migrations['copy']:.0f} / {self.migrations['recompute']:.0f})",
            "migrations aborted": f"{self.migrations['aborted']:.0f}" + "".join(
                f" {key.split(':', 1)[1]}={value:.0f}" for key, value in sorted(self.migrations.items())
                if key.startswith("aborted:") and value),
            "KV moved MiB": f"{self.migrations['bytes_moved'] / 2**20:.1f}",
            "mean downtime ms": ms(self.mean_downtime_ms),
            "KV transfer MB/s": f"{self.bandwidth_bytes_per_s / 1e6:.0f}" if self.bandwidth_bytes_per_s else "-",
            "mean KV use gap": "-" if self.mean_kv_gap is None else f"{self.mean_kv_gap:.2f}",
            "peak KV use (loaded / other)": " / ".join(
                f"{self.peak_kv_usage[replica]:.2f}"
                for replica in sorted(self.peak_kv_usage, key=lambda replica: replica != self.loaded_replica)),
        }


def _migration_sums(view: dict) -> dict[str, float]:
    keys = ("committed", "aborted", "copy", "recompute", "bytes_moved", "downtime_sum_s", "downtime_count")
    sums = {key: sum((entry.get("migration") or {}).get(key, 0) for entry in view["replicas"].values())
            for key in keys}
    for entry in view["replicas"].values():
        for reason, count in ((entry.get("migration") or {}).get("aborted_by_reason") or {}).items():
            sums[f"aborted:{reason}"] = sums.get(f"aborted:{reason}", 0) + count
    return sums


def set_policy(base: str, policy: str, options: dict | None = None) -> None:
    response = httpx.post(f"{base}/v1/admin/migration_policy", json={"name": policy, "options": options or {}},
                          headers=HEADERS, timeout=10)
    response.raise_for_status()


def run_policy(base: str, policy: str, workload: SkewedWorkload, options: dict | None = None) -> PolicyResult:
    set_policy(base, "none")
    before = wait_until_idle(base)
    set_policy(base, policy, options)
    with ClusterSampler(base) as sampler:
        records = asyncio.run(run_workload(base, workload))
        after = wait_until_idle(base)
    set_policy(base, "none")
    preemptions = {replica: entry["stats"]["num_preemptions"] - before["replicas"][replica]["stats"]["num_preemptions"]
                   for replica, entry in after["replicas"].items()}
    start, end = _migration_sums(before), _migration_sums(after)
    moved = {key: end[key] - start.get(key, 0) for key in end}
    count = moved.pop("downtime_count")
    downtime = moved.pop("downtime_sum_s")
    peaks: dict[str, float] = {}
    for sample in sampler.samples:
        for replica, entry in sample.items():
            peaks[replica] = max(peaks.get(replica, 0.0), entry["kv_usage"])
    loaded = min(after["replicas"])  # the router pins requests to the lowest replica id
    bandwidth = max((entry.get("migration") or {}).get("bandwidth_bytes_per_s", 0)
                    for entry in after["replicas"].values()) if moved["bytes_moved"] else 0.0
    return PolicyResult(policy, summarize(records, label=policy, scenario="skewed"), preemptions, loaded, moved,
                        downtime / count * 1e3 if count else None, sampler.mean_kv_gap(), peaks, bandwidth)


def format_table(results: list[PolicyResult]) -> str:
    rows = [result.row() for result in results]
    names = list(rows[0])
    width = max(len(name) for name in names)
    columns = [max(len(r.policy), *(len(row[name]) for name in names)) for r, row in zip(results, rows, strict=True)]
    cells = [[r.policy for r in results], *([row[name] for row in rows] for name in names)]
    lines = []
    for label, values in zip(["", *names], cells, strict=True):
        lines.append(label.ljust(width) + "  " + "  ".join(v.rjust(w) for v, w in zip(values, columns, strict=True)))
    return "\n".join(lines)


# ---- a local cluster ---------------------------------------------------------------------------------------
class LocalServe:
    """Ray on 127.0.0.1 with its own temp dir, Serve on a free port, the app; everything stopped on exit."""

    def __init__(self, args: dict, num_cpus: int = 2):
        self.args = args
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="mb-", dir="/tmp")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LocalServe:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray import serve

        from deployments.app import build_app

        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, _temp_dir=self.temp_dir,
                 _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 log_to_driver=False)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": self.port})
            serve.run(build_app(self.args), name="llm", route_prefix="/")
            deadline = time.monotonic() + 300
            while True:
                try:
                    view = cluster_view(self.base_url)
                    if view["num_replicas"] == 2 and not any(e["is_stale"] for e in view["replicas"].values()):
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError("the replicas did not start")
                time.sleep(0.5)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray
        from ray import serve

        from deployments.cluster.controller import stop_controller

        try:
            stop_controller(self.args["controller_name"], "elastic-serve")
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.migration", description=__doc__.split("\n")[0])
    defaults = SkewedWorkload()
    parser.add_argument("--num-requests", type=int, default=defaults.num_requests)
    parser.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens)
    parser.add_argument("--max-tokens", type=int, default=defaults.max_tokens)
    parser.add_argument("--interval", type=float, default=defaults.interval_s, help="seconds between arrivals")
    parser.add_argument("--device-memory", default="580MiB", help="each replica's pool (weights + KV)")
    parser.add_argument("--policies", default="none,balance", help="comma-separated, run in this order")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    workload = SkewedWorkload(options.num_requests, options.prompt_tokens, options.max_tokens, options.interval)
    results = []
    print(f"workload: {workload}", flush=True)
    with LocalServe(app_args(options.device_memory)) as serve_cluster:
        warm = SkewedWorkload(num_requests=2, prompt_tokens=16, max_tokens=8, interval_s=0.0)
        asyncio.run(run_workload(serve_cluster.base_url, warm))
        for policy in options.policies.split(","):
            print(f"running policy {policy} ...", flush=True)
            results.append(run_policy(serve_cluster.base_url, policy, workload))
    print(format_table(results))
    if options.json:
        Path(options.json).write_text(json.dumps(
            [{"policy": r.policy, "table": r.row(), "summary": r.summary.to_dict(), "preemptions": r.preemptions,
              "migrations": r.migrations, "mean_downtime_ms": r.mean_downtime_ms, "mean_kv_gap": r.mean_kv_gap,
              "peak_kv_usage": r.peak_kv_usage, "bandwidth_bytes_per_s": r.bandwidth_bytes_per_s}
             for r in results], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
