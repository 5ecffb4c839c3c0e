"""Run one load test end to end and write its results folder.

    python -m loadtest.run --scenario steady-32 --host http://127.0.0.1:8000 --duration 60 \
        --slo-ttft 1000 --slo-tpot 50 --label elastic

Steps: ask the server for its model (GET /v1/models); generate the scenario's workload here, with the
server's tokenizer when available, into workload.json; run Locust headless in a child process on that
file; sample /v1/memory and /metrics every second in a thread meanwhile; then compute the summary from
the per-request lines and draw the plots. Locust runs in its own process because it monkey-patches the
standard library with gevent at import, which breaks once torch or ray is loaded (the tokenizer may load
torch here) and would disturb the sampler's timing.

The folder (--out, default results/LABEL-SCENARIO-TIME): summary.json, requests.jsonl, workload.json,
memory.jsonl, metrics.jsonl, locust_stats.csv (and Locust's other CSVs), locust.log, latency.png,
throughput.png, memory.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from loadtest.metrics import Slo, read_records, summarize, time_series
from loadtest.report import bucket_width, format_summary, plot_latency, plot_memory, plot_throughput
from loadtest.scenarios import SCENARIOS, RunSettings
from loadtest.telemetry import TelemetrySampler, read_jsonl, read_memory_points
from loadtest.tokens import load_token_counter
from loadtest.workloads import generate

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"


@dataclass(frozen=True)
class ServerInfo:
    model: str
    max_model_len: int | None


def probe_server(host: str, timeout_s: float = 10.0) -> ServerInfo:
    """The model to ask for, and its context length when the server says (vLLM's `max_model_len`)."""
    response = requests.get(host.rstrip("/") + "/v1/models", timeout=timeout_s)
    response.raise_for_status()
    entry = response.json()["data"][0]
    max_len = entry.get("max_model_len")
    return ServerInfo(model=entry["id"], max_model_len=max_len if isinstance(max_len, int) else None)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run",
        description="Run a load test scenario against an OpenAI-compatible server.",
        epilog="scenarios:\n" + "\n".join(f"  {s.name:<14} {s.description}" for s in SCENARIOS.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", required=True, choices=sorted(SCENARIOS))
    parser.add_argument("--host", default="http://127.0.0.1:8000", help="base URL of the server")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--users", type=int, help="closed-loop users (base users for spike / long-context)")
    parser.add_argument("--rate", type=float, help="open-loop arrivals per second (poisson)")
    parser.add_argument("--slo-ttft", type=float, help="TTFT SLO in ms (for attainment and goodput)")
    parser.add_argument("--slo-tpot", type=float, help="TPOT SLO in ms")
    parser.add_argument("--out", type=Path, help="results folder (default results/LABEL-SCENARIO-TIME)")
    parser.add_argument("--label", default="", help="name of this run in tables and comparisons")
    parser.add_argument("--prompt-tokens", type=int, help="prompt length of fixed-length scenarios (128)")
    parser.add_argument("--output-tokens", type=int, help="output length of fixed-length scenarios (128)")
    parser.add_argument("--burst-size", type=int, help="requests of a one-shot burst (layerkv-burst: 8)")
    parser.add_argument(
        "--context-tokens",
        type=int,
        help="context for long prompts (default: the server's max_model_len from /v1/models, else 4096)",
    )
    parser.add_argument("--tokenizer", default="smollm2", help="smollm2 | words | tokenizer.json | HF folder")
    parser.add_argument("--model", help="model id to send (default: the first of GET /v1/models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-force-length",
        action="store_true",
        help="do not send ignore_eos/min_tokens (servers that reject unknown fields)",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=120.0,
        help="at the end, seconds to let running requests finish (their numbers count)",
    )
    parser.add_argument("--sample-interval", type=float, default=1.0, help="seconds between telemetry samples")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    label = args.label or args.scenario
    out = args.out or Path("results") / f"{label}-{args.scenario}-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    slo = Slo(ttft_ms=args.slo_ttft, tpot_ms=args.slo_tpot)

    try:
        server = probe_server(args.host)
    except (requests.RequestException, KeyError, IndexError, ValueError) as error:
        print(f"error: {args.host} does not answer GET /v1/models with a model: {error}", file=sys.stderr)
        return 2
    model = args.model or server.model
    settings = RunSettings(
        duration_s=args.duration,
        users=args.users,
        rate_per_s=args.rate,
        context_tokens=args.context_tokens or server.max_model_len or 4096,
        prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens,
        burst_size=args.burst_size,
        seed=args.seed,
    )
    plan = scenario.build(settings)
    counter = load_token_counter(args.tokenizer)
    workload = generate(args.scenario, plan.pools, counter, seed=args.seed)
    workload.save(out / "workload.json")
    print(f"{label}: {args.scenario} against {args.host} (model {model}) for {args.duration:g} s -> {out}")
    print(f"workload: {json.dumps(workload.stats())} (token counts: {counter.name})")

    requests_file = out / "requests.jsonl"
    requests_file.unlink(missing_ok=True)
    env = {
        **os.environ,
        "LOADTEST_WORKLOAD": str((out / "workload.json").resolve()),
        "LOADTEST_REQUESTS_FILE": str(requests_file.resolve()),
        "LOADTEST_SHAPE": plan.shape.to_env(),
        "LOADTEST_MODEL": model,
        "LOADTEST_ENDPOINT": plan.endpoint,
        "LOADTEST_FORCE_OUTPUT_LENGTH": "0" if args.no_force_length else "1",
    }
    command = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", args.host,
        "--csv", str(out / "locust"), "--csv-full-history",
        "--stop-timeout", f"{args.stop_timeout:g}", "--only-summary", *plan.user_classes,
    ]  # fmt: skip
    # No -t: the shape ends the test at --duration (Locust ignores -t when a shape runs, with a warning).
    sampler = TelemetrySampler(args.host, out, interval_s=args.sample_interval)
    started = time.time()
    sampler.start()
    locust_exit_code: int | None = None
    try:
        with open(out / "locust.log", "w", encoding="utf-8") as log:
            completed = subprocess.run(
                command, env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=args.duration + args.stop_timeout + 120,
            )  # fmt: skip
            locust_exit_code = completed.returncode  # 1 when any request failed; the summary says which
    except subprocess.TimeoutExpired:
        print("warning: Locust overran its time and was killed; summarising what finished", file=sys.stderr)
    finally:
        sampler.stop()
    finished = time.time()

    records = read_records(requests_file) if requests_file.exists() else []
    extra = {
        "host": args.host,
        "model": model,
        "duration_s": args.duration,
        "shape": plan.shape.name,
        "shape_params": plan.shape.resolved_params(),
        "user_classes": list(plan.user_classes),
        "workload": workload.stats(),
        "token_counter": counter.name,
        "settings": asdict(settings),
        "started_at": started,
        "finished_at": finished,
        "locust_exit_code": locust_exit_code,
        "has_memory_endpoint": sampler.has_memory_endpoint,
    }
    summary = summarize(records, slo=slo, label=label, scenario=args.scenario, extra=extra)
    (out / "summary.json").write_text(summary.to_json() + "\n", encoding="utf-8")

    # time 0 of the plots: the first request (Locust takes a second or two to start); samples before it show
    # the idle server at negative times
    origin = min((record.start_time for record in records), default=started)
    buckets = time_series(records, bucket_width(summary.window_s), origin=origin)
    title = f"{label} · {args.scenario}"
    plot_latency(buckets, out / "latency.png", title)
    plot_throughput(buckets, out / "throughput.png", title, read_jsonl(out / "metrics.jsonl"), origin=origin)
    plot_memory(read_memory_points(out / "memory.jsonl"), out / "memory.png", title, origin=origin)

    print(format_summary(summary))
    print(f"results: {out}")
    if not records:
        print(f"error: no request finished; see {out / 'locust.log'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
