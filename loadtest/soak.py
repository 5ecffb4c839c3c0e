"""Soak test: steady streaming load for N minutes while the RSS of every server process and the pools'
telemetry are recorded; fails when a process keeps growing.

    python -m loadtest.soak --minutes 30                      # starts serve_config.yaml (deployments.launch)
    python -m loadtest.soak --minutes 10 --host http://127.0.0.1:8000 --pid <launcher pid>   # attach

With no --host it starts `python -m deployments.launch CONFIG` on a fresh local Ray cluster (its own temp
dir) and stops it at the end (SIGINT: the drain path is part of what soaks). Load: --concurrency workers,
each streaming chat completions back to back, all to 127.0.0.1. Every --interval seconds: the RSS of each
process under the server's process tree (replicas, proxy, controllers, raylet, GCS, ...), keyed by its Ray
title, and /v1/cluster's totals (KV chunks used and free per replica).

Growth check, per process present from start to end: baseline = median RSS over the second quarter of the
run (after warm-up: first requests, allocator pools, compiled kernels), final = median over the last
quarter. A process fails when final - baseline exceeds both --max-growth (a fraction of baseline) and
--min-growth-mb. Also fails when a request fails (503 overloaded does not count). Writes rss.jsonl,
pools.jsonl, summary.json and soak.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import requests

PROMPTS = ["Write a short poem about {n} rivers.", "Explain in two sentences why {n} is a nice number.",
           "List {n} fruits and one fact about each.", "Tell a very short story about a robot named R{n}."]


@dataclass(frozen=True)
class Growth:
    name: str
    baseline_mb: float
    final_mb: float

    @property
    def growth_mb(self) -> float:
        return self.final_mb - self.baseline_mb

    @property
    def fraction(self) -> float:
        return self.growth_mb / self.baseline_mb if self.baseline_mb else 0.0


def title_name(title: str) -> str:
    """Ray titles a worker `ray::<actor>.<method running now>` (`ray::IDLE` between tasks): the actor part
    is stable across samples."""
    return title.split(" ")[0].split(".")[0]


def process_name(process: psutil.Process) -> str:
    cmdline = process.cmdline()
    if cmdline and cmdline[0].startswith("ray::"):
        return title_name(cmdline[0])
    return process.name()


def sample_rss(root_pid: int) -> dict[str, float]:
    """MB of RSS per process in the tree under root_pid (several of one name: name#1, name#2 by pid order)."""
    try:
        root = psutil.Process(root_pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    named: dict[str, list[tuple[int, float]]] = {}
    for process in processes:
        try:
            named.setdefault(process_name(process), []).append((process.pid, process.memory_info().rss / 2**20))
        except psutil.Error:
            continue
    sample = {}
    for name, entries in named.items():
        for index, (_, rss_mb) in enumerate(sorted(entries)):
            sample[name if len(entries) == 1 else f"{name}#{index + 1}"] = round(rss_mb, 1)
    return sample


def growth_per_process(samples: list[dict[str, float]]) -> list[Growth]:
    """Second-quarter median against last-quarter median, for processes in every sample of both windows."""
    count = len(samples)
    if count < 8:
        return []
    baseline_window = samples[count // 4: count // 2]
    final_window = samples[count - count // 4:]
    names = set.intersection(*(set(sample) for sample in baseline_window + final_window))
    return [Growth(name, statistics.median(sample[name] for sample in baseline_window),
                   statistics.median(sample[name] for sample in final_window)) for name in sorted(names)]


def failures(growths: list[Growth], max_growth: float, min_growth_mb: float) -> list[Growth]:
    return [growth for growth in growths if growth.fraction > max_growth and growth.growth_mb > min_growth_mb]


class Load:
    """--concurrency threads streaming chat completions until stopped."""

    def __init__(self, host: str, concurrency: int, max_tokens: int):
        self.host, self.concurrency, self.max_tokens = host, concurrency, max_tokens
        self.ok = self.overloaded = 0
        self.failed: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._worker, args=(index,), daemon=True)
                         for index in range(concurrency)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def _worker(self, index: int) -> None:
        number = index
        with requests.Session() as session:
            while not self._stop.is_set():
                number += self.concurrency
                body = {"messages": [{"role": "user", "content": PROMPTS[number % len(PROMPTS)].format(n=number)}],
                        "max_tokens": self.max_tokens, "stream": True}
                try:
                    outcome = self._one(session, body)
                except requests.RequestException as exc:
                    outcome = f"transport: {exc!r}"
                with self._lock:
                    if outcome == "ok":
                        self.ok += 1
                    elif outcome == "overloaded":
                        self.overloaded += 1
                    else:
                        self.failed.append(outcome)
                if outcome == "overloaded":
                    time.sleep(1.0)

    def _one(self, session: requests.Session, body: dict) -> str:
        with session.post(f"{self.host}/v1/chat/completions", json=body, stream=True, timeout=300) as response:
            if response.status_code == 503:
                return "overloaded"
            if response.status_code != 200:
                return f"status {response.status_code}: {response.text[:200]}"
            last = None
            for line in response.iter_lines(decode_unicode=True):
                if line and line.startswith("data: "):
                    last = line[len("data: "):]
                    if '"error"' in last:
                        return f"stream error: {last[:200]}"
            return "ok" if last == "[DONE]" else f"stream ended without [DONE] (last: {last!r})"


def pool_point(host: str) -> dict | None:
    try:
        view = requests.get(f"{host}/v1/cluster", timeout=5).json()
    except (requests.RequestException, ValueError):
        return None
    return {"totals": view.get("totals"),
            "replicas": {replica: entry["stats"] for replica, entry in view.get("replicas", {}).items()}}


def start_server(config: Path, out: Path) -> tuple[subprocess.Popen, str]:
    import yaml

    port = yaml.safe_load(config.read_text()).get("http_options", {}).get("port", 8000)
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="soak-", dir="/tmp"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(out / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "deployments.launch", str(config), "--address", "local"],
                              env=env, stdout=log, stderr=subprocess.STDOUT)
    return server, f"http://127.0.0.1:{port}"


def wait_ready(host: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            view = requests.get(f"{host}/v1/cluster", timeout=5).json()
            if view.get("num_replicas", 0) > 0 and requests.get(f"{host}/v1/models", timeout=5).ok:
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(2)
    raise TimeoutError(f"{host} not ready after {timeout_s} s")


def plot(rss: list[dict], pools: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True, height_ratios=[3, 1])
    names = sorted({name for point in rss for name in point["rss_mb"]},
                   key=lambda name: -max(point["rss_mb"].get(name, 0) for point in rss))
    for name in names[:10]:
        points = [(point["t_s"] / 60, point["rss_mb"][name]) for point in rss if name in point["rss_mb"]]
        top.plot(*zip(*points, strict=True), label=name)
    top.set_ylabel("RSS (MB)")
    top.set_title(title)
    top.legend(fontsize=7, loc="upper left", ncol=2)
    used = [(point["t_s"] / 60, point["pools"]["totals"]["kv_chunks_used"]) for point in pools
            if point.get("pools") and point["pools"].get("totals")]
    if used:
        bottom.plot(*zip(*used, strict=True), color="black")
    bottom.set_ylabel("KV chunks used")
    bottom.set_xlabel("minutes")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument("--config", type=Path, default=Path("serve_config.yaml"))
    parser.add_argument("--host", default=None, help="attach to this server instead of starting one")
    parser.add_argument("--pid", type=int, default=None, help="with --host: the root of the server's processes")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--max-growth", type=float, default=0.10, help="fraction of baseline RSS")
    parser.add_argument("--min-growth-mb", type=float, default=50.0)
    parser.add_argument("--out", type=Path, default=None)
    options = parser.parse_args(argv)
    if options.host is not None and options.pid is None:
        parser.error("--host needs --pid (the server's root process: its tree is what gets measured)")
    out = options.out or Path("results") / time.strftime("soak-%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    server = None
    if options.host is None:
        server, host = start_server(options.config, out)
        root_pid = server.pid
    else:
        host, root_pid = options.host.rstrip("/"), options.pid
    rss, pools = [], []
    load = Load(host, options.concurrency, options.max_tokens)
    try:
        wait_ready(host, 600)
        started = time.monotonic()
        load.start()
        with open(out / "rss.jsonl", "w") as rss_file, open(out / "pools.jsonl", "w") as pools_file:
            while (elapsed := time.monotonic() - started) < options.minutes * 60:
                point = {"t_s": round(elapsed, 1), "rss_mb": sample_rss(root_pid)}
                pool = {"t_s": point["t_s"], "pools": pool_point(host), "ok": load.ok, "failed": len(load.failed)}
                rss.append(point)
                pools.append(pool)
                rss_file.write(json.dumps(point) + "\n")
                pools_file.write(json.dumps(pool) + "\n")
                rss_file.flush()
                pools_file.flush()
                time.sleep(options.interval)
    finally:
        load.stop()
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=120)
            except subprocess.TimeoutExpired:
                server.kill()
    growths = growth_per_process([point["rss_mb"] for point in rss])
    grown = failures(growths, options.max_growth, options.min_growth_mb)
    summary = {"minutes": options.minutes, "concurrency": options.concurrency, "max_tokens": options.max_tokens,
               "requests_ok": load.ok, "requests_overloaded": load.overloaded, "requests_failed": len(load.failed),
               "first_failures": load.failed[:10], "max_growth": options.max_growth,
               "min_growth_mb": options.min_growth_mb,
               "growth": [{"process": growth.name, "baseline_mb": growth.baseline_mb, "final_mb": growth.final_mb,
                           "growth_mb": round(growth.growth_mb, 1), "fraction": round(growth.fraction, 4)}
                          for growth in growths],
               "failed_processes": [growth.name for growth in grown]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot(rss, pools, out / "soak.png", f"soak: {options.minutes:g} min, concurrency {options.concurrency}, "
         f"{load.ok} requests ok, {len(load.failed)} failed")
    print(json.dumps({key: summary[key] for key in ("requests_ok", "requests_failed", "failed_processes")}))
    for growth in growths:
        print(f"{growth.name:60s} {growth.baseline_mb:8.1f} -> {growth.final_mb:8.1f} MB ({growth.fraction:+.1%})")
    return 1 if grown or load.failed else 0


if __name__ == "__main__":
    sys.exit(main())
