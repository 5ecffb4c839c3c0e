"""Capacity planning: how many GPUs a model needs to serve a trace within an SLO.

    python -m loadtest.sim plan --model llama-3-8b --gpu h100 --trace FILE --slo ttft=2,tpot=0.1 [--out DIR]

Runs the trace on fixed fleets of 1, 2, 4, ... GPUs (then bisects) with the simulator's replicas and the
deployed router, and reports the smallest fleet whose SLO attainment reaches `--target` (default 99%),
with every fleet tried. For the chosen fleet it writes two plots to `--out`: the pool balloons over time
(weights, KV, activations, summed over the fleet) and the TTFT CDF. `--trace synthetic` uses a one-hour
diurnal trace at `--rate` requests/s.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from loadtest.sim.cluster import Cluster, ClusterConfig
from loadtest.sim.registry import experiment
from loadtest.sim.replica import ReplicaConfig
from loadtest.sim.report import RunResult, Slo, percentile_ms, summarize, table
from loadtest.sim.trace import DiurnalTrace, clip_to_context, load_trace


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--gpu", default="h100-80g")
    parser.add_argument("--trace", default="synthetic", help="a CSV (BurstGPT, Azure, arrival,prompt_tokens,...) "
                        "or 'synthetic'")
    parser.add_argument("--rate", type=float, default=2.0, help="synthetic: mean requests/s")
    parser.add_argument("--hours", type=float, default=1.0, help="cut the trace after this many hours")
    parser.add_argument("--slo", default="ttft=2,tpot=0.1")
    parser.add_argument("--target", type=float, default=0.99, help="SLO attainment the fleet must reach")
    parser.add_argument("--max-gpus", type=int, default=64)
    parser.add_argument("--out", default="sim-plan", help="folder for the plots")
    parser.add_argument("--seed", type=int, default=0)


def _try(trace, model: str, gpu: str, num: int, seed: int) -> tuple[Cluster, RunResult]:
    started = time.perf_counter()
    config = ClusterConfig(replica=ReplicaConfig(model=model, device=gpu), num_replicas=num, seed=seed)
    cluster = Cluster(trace, config).run()
    return cluster, summarize(cluster, f"{num} GPUs", time.perf_counter() - started)


def pool_plots(cluster: Cluster, result: RunResult, out: Path, title: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    minutes = cluster.now > 600  # short runs (a spike) in seconds
    times = np.array([sample.time_s for sample in cluster.timeline]) / (60 if minutes else 1)
    chunk_gib = cluster.replicas[0].engine.pool.chunk_bytes / 2**30
    figure, axis = plt.subplots(figsize=(8, 4))
    order = {"weights": 0, "activations": 1, "kv": 2}
    clients = sorted({client for sample in cluster.timeline for client in sample.pool_chunks},
                     key=lambda client: (order.get(client, 3), client))
    stacks = [[sample.pool_chunks.get(client, 0) * chunk_gib for sample in cluster.timeline] for client in clients]
    axis.stackplot(times, stacks, labels=clients)
    axis.set(xlabel="minutes" if minutes else "seconds", ylabel="GiB held (all GPUs)",
             title=f"SIMULATED pool balloons: {title}")
    axis.legend(loc="upper left")
    balloons = out / "pool_balloons.png"
    figure.savefig(balloons, dpi=100, bbox_inches="tight")
    plt.close(figure)
    figure, axis = plt.subplots(figsize=(6, 4))
    ttft = np.sort(result.ttft_s)
    axis.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft))
    axis.set(xscale="log", xlabel="TTFT (s)", ylabel="share of requests", title=f"SIMULATED TTFT CDF: {title}")
    cdf = out / "ttft_cdf.png"
    figure.savefig(cdf, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return [balloons, cdf]


@experiment("plan", "capacity planning: GPUs needed for a trace within an SLO, with plots", _arguments)
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    slo = Slo.parse(args.slo)
    if args.trace == "synthetic":
        trace = DiurnalTrace(hours=args.hours, mean_rate_per_s=args.rate, period_hours=args.hours,
                             prompt_median=1024, output_median=512, output_range=(16, 4096)).generate(args.seed)
    else:
        trace = tuple(r for r in load_trace(args.trace) if r.arrival_s <= args.hours * 3600)
    trace = clip_to_context(trace, ReplicaConfig().max_model_len)
    tried: dict[int, tuple[Cluster, RunResult]] = {}

    def ok(num: int) -> bool:
        if num not in tried:
            tried[num] = _try(trace, args.model, args.gpu, num, args.seed)
        return tried[num][1].attainment(slo) >= args.target

    num = 1
    while not ok(num) and num < args.max_gpus:
        num = min(args.max_gpus, num * 2)
    low = num // 2
    while low + 1 < num:  # the smallest passing fleet in (low, num]
        middle = (low + num) // 2
        num, low = (middle, low) if ok(middle) else (num, middle)
    rows = [(n, f"{r.attainment(slo):.2%}", percentile_ms(r.ttft_s, 50), percentile_ms(r.ttft_s, 99),
             percentile_ms(r.tpot_s, 99), r.num_preemptions, f"{r.wall_s:.1f} s")
            for n, (_, r) in sorted(tried.items())]
    print(f"trace: {args.trace}: {len(trace)} requests over {trace[-1].arrival_s / 3600:.2f} h" if trace else "empty")
    print(table(f"SIMULATED capacity plan: {args.model} on {args.gpu}, SLO {args.slo}, target {args.target:.0%}",
                ("GPUs", "SLO attained", "TTFT p50", "TTFT p99", "TPOT p99", "preemptions", "sim time"), rows))
    passed = ok(num)
    print(f"GPUs needed: {num}" if passed else f"GPUs needed: more than {args.max_gpus} (the SLO is not met)")
    cluster, result = tried[num]
    for path in pool_plots(cluster, result, Path(args.out), f"{args.model} x {num} on {args.gpu}"):
        print(f"wrote {path}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    return 0 if passed else 1
