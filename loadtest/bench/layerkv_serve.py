"""`python -m loadtest.bench.layerkv_serve`: LayerKV's queued burst through Ray Serve and Locust.

The served twin of `python -m loadtest.offline --mode burst` (same engine settings, same pool rule). For each
system (`--systems`, default `none,layerwise`: `kv_offload` none, then layerwise with `kv_staging` auto = in
place on the host backend) it writes a Serve config (the repository's serve_config.yaml with this burst's
engine args and a free port), starts it with `python -m deployments.launch CONFIG --address local` (`serve run`
with a graceful stop) on a throwaway local Ray cluster (its own RAY_TMPDIR), waits for /v1/models, runs
`python -m loadtest.run --scenario layerkv-burst` (Locust in its own process: N prompts at once, open loop,
the test ends when all are answered) and stops the server. Then it prints one side-by-side table: TTFT and
TPOT p50/p99, makespan (first request sent -> last finished), SLO attainment (client side, and the engine's
own count), peak device KV (/v1/cluster pools) and peak host KV (`elastic:kv_offloaded_host_bytes`),
preemptions, load averages, and the ratios none / layerwise.

The pool is the offline burst's: weights + one full step's activations + `--kv-requests` whole requests' KV
(prompt + output), measured on a probe engine in this process (loadtest/offline/burst.py `probe_budget`).

    OMP_WAIT_POLICY=PASSIVE python -m loadtest.bench.layerkv_serve [--duration 1200] [--out results/layerkv-serve]
        [--plot PNG] [--json OUT] [any option of the offline burst: --num-prompts 8 --prompt-len 256
        --output-len 768 --kv-requests 2 --threads 2 --dtype float32 --ttft-slo-ms 10000 --tpot-slo-ms 500
        --systems none,layerwise ...]

The replicas inherit this process's environment (OMP_WAIT_POLICY included).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml

from loadtest.bench.kunserve_serve import free_port
from loadtest.bench.serve import cpu_flags, load_average, run_server
from loadtest.metrics import read_records
from loadtest.offline import burst
from loadtest.telemetry import metric_total, read_jsonl, read_memory_points

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
# The offline burst's defaults for this run (LayerKV's queued burst on the CPU); later arguments win.
BURST_DEFAULTS = ("--num-prompts", "8", "--prompt-len", "256", "--output-len", "768", "--kv-requests", "2",
                  "--threads", "2", "--dtype", "float32", "--ttft-slo-ms", "10000", "--tpot-slo-ms", "500",
                  "--systems", "none,layerwise")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(this runner's options, the offline burst's options with this run's defaults)."""
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.layerkv_serve",
                                     description=__doc__.split("\n\n")[0],
                                     epilog="Other options: those of python -m loadtest.offline --mode burst.")
    parser.add_argument("--config", type=Path, default=ROOT / "serve_config.yaml", help="the Serve config to adapt")
    parser.add_argument("--duration", type=float, default=1200.0, help="longest a system's burst may take (s)")
    parser.add_argument("--start-timeout", type=float, default=600.0, help="seconds a server may take to answer")
    parser.add_argument("--out", type=Path, default=Path("results/layerkv-serve"))
    parser.add_argument("--tokenizer", default="smollm2", help="of the load test's prompts (loadtest.run)")
    parser.add_argument("--plot", default=None, help="device vs host KV over time, one panel per system (png)")
    parser.add_argument("--json", default=None, help="write the table's numbers here")
    options, rest = parser.parse_known_args(argv)
    return options, burst.parse_args([*BURST_DEFAULTS, *rest])


def app_args(args: argparse.Namespace, system: str, budget: int) -> dict:
    """The `args:` of one system's application: the offline burst's `engine_config`, as AppArgs spells it."""
    offload, _, staging = system.partition(":")
    return {"dtype": args.dtype, "device": "cpu", "device_memory": budget,
            "host_buffer": int(args.host_gib * burst.GIB), "cpus_per_rank": args.threads,
            "num_threads": args.threads, "enable_prefix_caching": False,
            "max_model_len": args.prompt_len + args.output_len + 16, "max_num_seqs": args.num_prompts,
            "max_num_batched_tokens": args.max_num_batched_tokens, "kv_offload": offload,
            "ttft_slo_ms": args.ttft_slo_ms, "tpot_slo_ms": args.tpot_slo_ms,
            "engine_options": {"kv_staging": staging or "auto"}, "controller_name": f"layerkv-bench-{offload}"}


def serve_config(template: dict, args: argparse.Namespace, system: str, budget: int, port: int) -> dict:
    """`template` (serve_config.yaml) with one application serving this burst's engine on `port`."""
    config = json.loads(json.dumps(template))
    config["http_options"] = {**config.get("http_options", {}), "host": "127.0.0.1", "port": port}
    app = config["applications"][0]
    config["applications"] = [app]
    app["name"] = "layerkv-burst"
    app["args"] = {**app.get("args", {}), **app_args(args, system, budget)}
    for deployment in app.get("deployments", []):
        deployment.pop("autoscaling_config", None)
        deployment["num_replicas"] = 1
    return config


def server_env(ray_tmp: str) -> dict[str, str]:
    """A new local Ray cluster of its own (RAY_TMPDIR) that imports this checkout."""
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": pythonpath}


def load_test_command(args: argparse.Namespace, options: argparse.Namespace, base_url: str, label: str,
                      folder: Path) -> list[str]:
    return [sys.executable, "-m", "loadtest.run", "--scenario", "layerkv-burst", "--host", base_url,
            "--burst-size", str(args.num_prompts), "--prompt-tokens", str(args.prompt_len),
            "--output-tokens", str(args.output_len), "--duration", f"{options.duration:g}",
            "--slo-ttft", f"{args.ttft_slo_ms:g}", "--slo-tpot", f"{args.tpot_slo_ms:g}", "--label", label,
            "--tokenizer", options.tokenizer, "--seed", str(args.seed), "--stop-timeout", "60", "--out", str(folder)]


def kv_samples(folder: Path) -> dict:
    """From a run's telemetry: peaks of device KV (pools) and host KV (offloaded layers), the engine's
    preemptions and SLO count (counters: Prometheus adds `_total`), and a (s since the burst, device bytes,
    host bytes) timeline."""
    memory = read_memory_points(folder / "memory.jsonl")
    metrics = [row for row in read_jsonl(folder / "metrics.jsonl") if row.get("status") == 200]
    times = [row["time"] for row in metrics]

    def value(row: dict, name: str) -> float:
        return metric_total(row.get("values") or {}, name) or 0.0

    def host_at(time_s: float) -> float:  # the metrics sample nearest in time (both sampled every second)
        if not metrics:
            return 0.0
        index = bisect.bisect_left(times, time_s)
        nearest = min((i for i in (index - 1, index) if 0 <= i < len(metrics)), key=lambda i: abs(times[i] - time_s))
        return value(metrics[nearest], "kv_offloaded_host_bytes")

    origin = min((record.start_time for record in read_records(folder / "requests.jsonl")), default=0.0)
    timeline = [(point.time - origin, point.client_bytes.get("kv", 0.0), host_at(point.time)) for point in memory]
    last = metrics[-1] if metrics else {}
    return {
        "peak_device_kv_mib": max((point[1] for point in timeline), default=0.0) / MIB,
        "peak_host_kv_mib": max((value(row, "kv_offloaded_host_bytes") for row in metrics), default=0.0) / MIB,
        "peak_offloaded_layers": max((value(row, "kv_offloaded_layers") for row in metrics), default=0.0),
        "preemptions": value(last, "num_preemptions_total") if last else None,
        "engine_slo": (value(last, "slo_attained_total"), value(last, "slo_finished_total")) if last else None,
        "timeline": timeline,
    }


def run_system(system: str, args: argparse.Namespace, options: argparse.Namespace, budget: int,
               template: dict) -> dict:
    label = system.replace(":", "-")
    folder = options.out / label
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    config_path = folder / "serve_config.yaml"
    config_path.write_text(yaml.safe_dump(serve_config(template, args, system, budget, port), sort_keys=False))
    ray_tmp = tempfile.mkdtemp(prefix="lk-", dir="/tmp")  # short: Unix socket paths are limited
    command = [sys.executable, "-m", "deployments.launch", str(config_path), "--address", "local",
               "--num-cpus", f"{max(2, args.threads)}"]
    before = load_average()

    def measure() -> None:
        subprocess.run(load_test_command(args, options, base_url, label, folder), cwd=ROOT, check=True)

    try:
        start_s, _ = run_server(command, server_env(ray_tmp), base_url, folder / "server.log", measure,
                                options.start_timeout)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    summary = json.loads((folder / "summary.json").read_text())
    result = {"summary": summary, "start_s": start_s, "load": f"{before} -> {load_average()}", **kv_samples(folder)}
    print(f"{system}: TTFT p99 {summary['ttft_ms']['p99']:.0f} ms, makespan {summary['window_s']:.1f} s, "
          f"attainment {summary['slo_attainment']}, load {result['load']}", file=sys.stderr, flush=True)
    return result


def _seconds(ms: float | None) -> str:
    return "-" if ms is None else f"{ms / 1000:.1f} s"


def _ratio(first: float | None, second: float | None) -> str:
    return "-" if not first or not second else f"{first / second:.2f}x"


def format_table(results: dict[str, dict], args: argparse.Namespace, budget: int) -> str:
    """One column per system, and `<first> / <other>` ratio columns for the times (> 1: the other is faster)."""
    systems = list(results)
    first = systems[0]
    summaries = {system: result["summary"] for system, result in results.items()}
    rows: list[tuple[str, dict[str, str], dict[str, str]]] = []

    def timed(name: str, pick, show) -> None:
        values = {system: pick(summary) for system, summary in summaries.items()}
        rows.append((name, {s: show(v) for s, v in values.items()},
                     {s: _ratio(values[first], values[s]) for s in systems[1:]}))

    for metric, title in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT")):
        for quantile in ("p50", "p99"):
            show = _seconds if metric == "ttft_ms" else (lambda v: "-" if v is None else f"{v:.0f} ms")
            timed(f"{title} {quantile}", lambda s, m=metric, q=quantile: s[m][q], show)
    timed("makespan (first sent -> last finished)", lambda s: s["window_s"] * 1000, _seconds)

    def plain(name: str, pick) -> None:
        rows.append((name, {system: pick(system) for system in systems}, {}))

    def attained(system: str) -> str:
        summary = summaries[system]
        good = round((summary["slo_attainment"] or 0.0) * summary["num_requests"])
        return f"{good}/{summary['num_requests']} ({(summary['slo_attainment'] or 0.0) * 100:.1f}%)"

    def engine_slo(system: str) -> str:
        count = results[system]["engine_slo"]
        return "-" if count is None else f"{count[0]:.0f}/{count[1]:.0f}"

    plain(f"SLO attainment (TTFT {args.ttft_slo_ms:g} ms, TPOT {args.tpot_slo_ms:g} ms)", attained)
    plain("the engine's own count (elastic:slo_attained / slo_finished)", engine_slo)
    plain("requests ok / sent", lambda s: f"{summaries[s]['num_ok']}/{summaries[s]['num_requests']}")
    plain("peak device KV (/v1/cluster pools)", lambda s: f"{results[s]['peak_device_kv_mib']:.0f} MiB")
    plain("peak host KV (elastic:kv_offloaded_host_bytes)", lambda s: f"{results[s]['peak_host_kv_mib']:.0f} MiB")
    plain("peak (request, layer) pairs on the host", lambda s: f"{results[s]['peak_offloaded_layers']:.0f}")
    plain("preemptions", lambda s: "-" if results[s]["preemptions"] is None else f"{results[s]['preemptions']:.0f}")
    plain("server healthy after", lambda s: f"{results[s]['start_s']:.0f} s")
    plain("load average (1/5/15 min) before -> after", lambda s: results[s]["load"])
    header = ["", *systems, *(f"{first} / {system}" for system in systems[1:])]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values, ratios in rows:
        cells = [name, *(values[s] for s in systems), *(ratios.get(s, "") for s in systems[1:])]
        lines.append("| " + " | ".join(cells) + " |")
    title = (f"== served burst (Ray Serve + Locust, scenario layerkv-burst): {args.num_prompts} prompts x "
             f"{args.prompt_len} tokens, {args.output_len} out, all at once; pool {budget / MIB:.0f} MiB (weights + a "
             f"step's activations + {args.kv_requests} requests' KV), {args.dtype}, {args.threads} threads, "
             f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}; CPU flags: {cpu_flags()}; "
             f"{os.cpu_count()} cores")
    return "\n".join([title, *lines])


def main(argv: Sequence[str] | None = None) -> dict:
    options, args = parse_args(argv)
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; load avg at start {load_average()}", flush=True)
    budget, _ = burst.probe_budget(args)
    template = yaml.safe_load(options.config.read_text())
    results = {system: run_system(system, args, options, budget, template) for system in args.systems.split(",")}
    print(format_table(results, args, budget), flush=True)
    if options.plot:
        burst.plot_timelines(results, options.plot)
    if options.json:
        Path(options.json).write_text(json.dumps({"config": vars(args), "budget": budget, "results": results},
                                                 indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
