"""`python -m loadtest.bench.kunserve_serve`: KunServe's memory spike through Ray Serve and Locust.

For each mode (`none`: no dropping, no migration; `dropping`: parameter dropping; `migration`: the
`balance` migration policy only) it starts a throwaway local Ray cluster (its own temp dir), deploys two
LLMServer replicas with tight pools, runs `python -m loadtest.run --scenario spike` against them (Locust in
its own process: base users, 4x for the middle third of the run, then back) and shuts everything down.
Then it prints one table line per mode from each run's summary.json (TTFT p50/p99 overall, TPOT mean/p99,
goodput) and one from its requests.jsonl: the TTFT p50 / p99 / worst of the requests sent during the spike
(what the issue's goal is about), and when the first drop was ordered after the spike's first request. It
copies the dropping run's memory plot (the weights balloon shrinking and growing) to --plot. `--repeat N` runs
the modes N times in turn (one round after another, so each mode sees the VM's speed of its hour) and ends with
each mode's spike p99 per round, the baseline's over it per round, and their medians: one run per mode moves
a lot, the baseline's wait for KV most (5.6 to 23.4 s over four runs of one command, docs/KUNSERVE.md).

    python -m loadtest.bench.kunserve_serve --duration 90 --users 4 --plot docs/kunserve-serve-spike-memory.png
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

MODES = {
    "none": {"migration_policy": "none"},
    "dropping": {"migration_policy": "none", "parameter_dropping": {
        "enabled": True, "high_watermark": 0.9, "restore_watermark": 0.5, "drop_after_s": 1.0,
        "restore_after_s": 5.0}},
    "migration": {"migration_policy": "balance"},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_args(mode: str, device_memory: str, dtype: str, check_kv: bool = False) -> dict:
    """`check_kv`: the engines audit their KV mappings after every step and call (EngineConfig.check_kv_invariants)."""
    return {"device": "cpu", "dtype": dtype, "device_memory": device_memory, "host_buffer": "64MiB",
            "enable_prefix_caching": False, "max_model_len": 512, "num_threads": 1,
            "controller_name": f"kunserve-bench-{mode}", **MODES[mode],
            "deployment_options": {"num_replicas": 2},
            "engine_options": {"check_kv_invariants": True} if check_kv else {}}


def wait_ready(base: str, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            view = requests.get(f"{base}/v1/cluster", timeout=5).json()
            if view["num_replicas"] == 2 and not any(e["is_stale"] for e in view["replicas"].values()):
                return
        except (requests.RequestException, ValueError, KeyError):
            pass
        time.sleep(1.0)
    raise TimeoutError("the two replicas did not report in time")


def run_mode(mode: str, options: argparse.Namespace, out: Path, logs: Path | None = None) -> dict:
    import ray
    from ray import serve

    from deployments.app import build_app

    temp_dir = tempfile.mkdtemp(prefix="rk-", dir="/tmp")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=2, include_dashboard=False, _temp_dir=temp_dir,
             _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, log_to_driver=False)
    dropping_view: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app(serve_args(mode, options.device_memory, options.dtype, options.check_kv))
        serve.run(app, name="llm", route_prefix="/")
        wait_ready(base)
        folder = out / mode
        command = [sys.executable, "-m", "loadtest.run", "--scenario", "spike", "--host", base,
                   "--duration", str(options.duration), "--users", str(options.users), "--label", mode,
                   "--prompt-tokens", str(options.prompt_tokens), "--output-tokens", str(options.output_tokens),
                   "--out", str(folder)]
        subprocess.run(command, check=True)
        dropping_view = requests.get(f"{base}/v1/cluster", timeout=10).json().get("parameter_dropping", {})
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if logs is not None:  # the replicas' (serve/) and the cluster controller's (worker-*) logs
                shutil.copytree(Path(temp_dir) / "session_latest" / "logs", logs / mode, dirs_exist_ok=True)
            shutil.rmtree(temp_dir, ignore_errors=True)
    summary = json.loads((folder / "summary.json").read_text())
    summary["parameter_dropping"] = dropping_view
    records = [json.loads(line) for line in (folder / "requests.jsonl").read_text().splitlines() if line.strip()]
    summary["spike"] = spike_window(records, options.duration, dropping_view.get("recent_orders", []))
    (folder / "parameter_dropping.json").write_text(json.dumps(dropping_view, indent=1))
    return summary


def spike_window(records: list[dict], duration_s: float, orders: list[dict] = ()) -> dict:
    """TTFT (s) of the requests sent during the spike (the middle third of the run, counted from the first
    request), and the first drop order's delay after the spike's first request (None: no drop)."""
    start = min(record["start_time"] for record in records)
    sent = sorted((record for record in records if duration_s / 3 <= record["start_time"] - start < 2 * duration_s / 3
                   and record.get("ttft_s") is not None), key=lambda record: record["ttft_s"])
    if not sent:
        return {"num_requests": 0}
    ttfts = [record["ttft_s"] for record in sent]
    first = min(record["start_time"] for record in sent)
    drops = [order["time"] - first for order in orders if order.get("action") == "drop" and order["time"] >= first]
    return {"num_requests": len(ttfts), "p50_s": ttfts[len(ttfts) // 2],
            "p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], "worst_s": ttfts[-1],
            "first_drop_after_s": min(drops) if drops else None}


def spike_row(mode: str, spike: dict) -> str:
    if not spike.get("num_requests"):
        return f"| {mode} | 0 | — | — | — | — |"
    drop = spike.get("first_drop_after_s")
    return (f"| {mode} | {spike['num_requests']} | {spike['p50_s']:.2f} | {spike['p99_s']:.2f} | "
            f"{spike['worst_s']:.2f} | {'—' if drop is None else f'{drop:.2f}'} |")


def row(mode: str, summary: dict) -> str:
    def ms(block: str, key: str) -> str:
        value = (summary.get(block) or {}).get(key)
        return "—" if value is None else f"{value:.0f}"

    drops = summary.get("parameter_dropping") or {}
    return (f"| {mode} | {ms('ttft_ms', 'p50')} / {ms('ttft_ms', 'p99')} | {ms('tpot_ms', 'mean')} / "
            f"{ms('tpot_ms', 'p99')} | {summary.get('goodput_output_tokens_per_s', 0):.1f} | "
            f"{summary.get('num_ok')} / {summary.get('num_requests')} | "
            f"{drops.get('num_drops', '—')} / {drops.get('num_restores', '—')} |")


def rounds_table(rounds: list[dict[str, dict]]) -> str:
    """Several rounds of the same modes: each mode's spike p99 TTFT and mean TPOT per round, the first mode's
    spike p99 over this mode's (the baseline's over it: higher is better) per round, and the medians."""
    modes = list(rounds[0])
    base = modes[0]

    def p99(summary: dict) -> float | None:
        return summary["spike"].get("p99_s")

    def tpot(summary: dict) -> float | None:
        return (summary.get("tpot_ms") or {}).get("mean")

    def listed(values: list, digits: int) -> str:
        return ", ".join("—" if value is None else f"{value:.{digits}f}" for value in values)

    def median(values: list) -> str:
        known = [value for value in values if value is not None]
        return "—" if not known else f"{statistics.median(known):.2f}"

    lines = [f"| mode | spike p99 TTFT per round (s) | median | {base} / mode per round | median | "
             f"TPOT mean per round (ms) | TPOT / {base}'s (median) |", "|---|---|---|---|---|---|---|"]
    for mode in modes:
        p99s = [p99(one[mode]) for one in rounds]
        ratios = [None if p99(one[base]) is None or not p99(one[mode]) else p99(one[base]) / p99(one[mode])
                  for one in rounds]
        tpots = [tpot(one[mode]) for one in rounds]
        slower = [None if tpot(one[base]) is None or tpot(one[mode]) is None else tpot(one[mode]) / tpot(one[base])
                  for one in rounds]
        lines.append(f"| {mode} | {listed(p99s, 2)} | {median(p99s)} | {listed(ratios, 1)} | {median(ratios)} | "
                     f"{listed(tpots, 0)} | {median(slower)} |")
    return "\n".join(lines)


def print_round(summaries: dict[str, dict]) -> None:
    print("| mode | TTFT p50 / p99 (ms) | TPOT mean / p99 (ms) | goodput (tok/s) | ok / requests | drops / restores |")
    print("|---|---|---|---|---|---|")
    for mode, summary in summaries.items():
        print(row(mode, summary))
    print("\nRequests sent during the spike:\n")
    print("| mode | requests | TTFT p50 (s) | p99 (s) | worst (s) | first drop ordered after (s) |")
    print("|---|---|---|---|---|---|")
    for mode, summary in summaries.items():
        print(spike_row(mode, summary["spike"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.kunserve_serve", description=__doc__.split("\n")[0])
    parser.add_argument("--modes", default="none,dropping,migration")
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of load; the spike is the middle third")
    parser.add_argument("--users", type=int, default=4, help="base users (4x during the spike)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    parser.add_argument("--device-memory", default="370MiB",
                        help="each replica's pool (tight: the bf16 weights, 312 MiB, and KV for ~17 pages)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("results/kunserve-serve"))
    parser.add_argument("--plot", type=Path, help="copy the dropping run's memory plot here")
    parser.add_argument("--logs", type=Path, help="keep each mode's Serve logs under this folder")
    parser.add_argument("--check-kv", action="store_true",
                        help="debug: the engines check their KV mappings after every step and call (slower; a "
                             "violation stops that engine with the trail of events in its log)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds of all modes, alternating (results under OUT/roundN); then the medians")
    options = parser.parse_args(argv)
    rounds = []
    for number in range(options.repeat):
        out = options.out if options.repeat == 1 else options.out / f"round{number}"
        logs = None if options.logs is None else (options.logs if options.repeat == 1
                                                  else options.logs / f"round{number}")
        rounds.append({mode: run_mode(mode, options, out, logs) for mode in options.modes.split(",")})
        if options.repeat > 1:
            print(f"\nround {number}:\n")
        print_round(rounds[-1])
    if options.repeat > 1:
        print(f"\nOver the {options.repeat} rounds:\n\n{rounds_table(rounds)}")
    if options.plot is not None and (out / "dropping" / "memory.png").exists():  # the last round's
        shutil.copy(out / "dropping" / "memory.png", options.plot)


if __name__ == "__main__":
    main()
