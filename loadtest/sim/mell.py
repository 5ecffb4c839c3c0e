"""Mell's experiment: GPUs needed over a diurnal, bursty, several-model trace, with migration + packing vs none.

    python -m loadtest.sim mell [--hours 2] [--rate 1.5] [--models llama-3-8b,qwen2.5-7b] [--gpu h100] [--trace FILE]

Each model is its own deployment (its own fleet, router and controller, as one Serve application per
model). Both runs autoscale like Ray Serve (queue length, `target_ongoing_requests`), from one replica:
- `none`: no migration; Serve scales down by stopping the newest replica, which finishes its requests first;
- `balance+pack` (`drain: newest`) with the `kv_packing_policy` autoscaling rule: the deployed migration
  policy moves requests off overloaded replicas and drains the newest replica into the others when they can
  hold its load, and the replica leaves as soon as it is empty.
Reported per run: GPU-hours, mean and peak GPUs, mean KV utilisation of the GPUs held, migrations per hour,
TTFT p99 and SLO attainment, and the seed's figures (Mell: 31% fewer GPUs, 43% higher GPU utilisation).

The synthetic trace (`--seed`): per model, Poisson arrivals whose rate follows a day compressed into
`--period` hours (peak/trough 7x), plus bursts (2 per hour, ~2 min, 3x the rate); prompts log-normal with
median 1K tokens, outputs median 3K (a reasoning model's chat: trace.py documents every parameter).
`--trace FILE` replays a BurstGPT / Azure / own-format CSV instead (its `Model` column splits it into
deployments).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from loadtest.sim.cluster import Cluster, ClusterConfig
from loadtest.sim.registry import experiment
from loadtest.sim.replica import ReplicaConfig
from loadtest.sim.report import RunResult, Slo, percentile_ms, summarize, table
from loadtest.sim.trace import BurstyTrace, DiurnalTrace, TraceRequest, clip_to_context, load_trace, multi_model

SEED = "Mell (2024): 31% fewer GPUs and 43% higher GPU utilisation than without migration"
POLICIES = {"none": {}, "balance+pack": {"drain": "newest"}}


def synthetic(models: list[str], hours: float, rate: float, period_hours: float, seed: int) -> tuple[TraceRequest, ...]:
    traces = {}
    for index, model in enumerate(models):
        diurnal = DiurnalTrace(hours=hours, mean_rate_per_s=rate, period_hours=period_hours,
                               peak_hour=period_hours * (0.3 + 0.4 * index / max(1, len(models))))
        traces[model] = BurstyTrace(diurnal).generate(seed + index)
    return multi_model(traces)


def run_fleet(trace: tuple[TraceRequest, ...], config: ClusterConfig, label: str) -> tuple[Cluster, RunResult]:
    started = time.perf_counter()
    cluster = Cluster(clip_to_context(trace, config.replica.max_model_len), config).run()
    return cluster, summarize(cluster, label, time.perf_counter() - started)


def kv_utilisation(cluster: Cluster) -> float:
    used = sum(sample.kv_used_chunks for sample in cluster.timeline)
    capacity = sum(sample.kv_capacity_chunks for sample in cluster.timeline)
    return used / capacity if capacity else 0.0


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default="llama-3-8b,qwen2.5-7b")
    parser.add_argument("--gpu", default="h100-80g")
    parser.add_argument("--hours", type=float, default=2.0)
    parser.add_argument("--period", type=float, default=2.0, help="hours of one simulated day (diurnal period)")
    parser.add_argument("--rate", type=float, default=1.5, help="mean requests/s per model")
    parser.add_argument("--trace", default=None, help="replay a CSV (BurstGPT, Azure, or arrival,prompt_tokens,...)")
    parser.add_argument("--max-replicas", type=int, default=16)
    parser.add_argument("--target-ongoing", type=float, default=32.0, help="Serve's target_ongoing_requests")
    parser.add_argument("--slo", default="ttft=2,tpot=0.1")
    parser.add_argument("--seed", type=int, default=0)


@experiment("mell", "Mell: GPUs needed over a multi-model trace, migration + packing vs none", _arguments)
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    models = args.models.split(",")
    if args.trace:
        trace = load_trace(args.trace)
        trace = tuple(r for r in trace if r.arrival_s <= args.hours * 3600)
        names = sorted({r.model for r in trace})
        if len(names) > len(models) or names == [""]:  # one deployment per trace model, served as models[i]
            names = names[: len(models)]
        mapping = dict(zip(names, models, strict=False))
        trace = tuple(replace(r, model=mapping[r.model]) for r in trace if r.model in mapping)
        source = f"{args.trace}: {len(trace)} requests"
    else:
        trace = synthetic(models, args.hours, args.rate, args.period, args.seed)
        source = (f"synthetic: {len(models)} models x {args.rate:g} req/s mean, diurnal period {args.period:g} h "
                  f"(peak/trough 7x) + bursts, {args.hours:g} h, seed {args.seed}: {len(trace)} requests")
    slo = Slo.parse(args.slo)
    rows, totals = [], {}
    for policy, options in POLICIES.items():
        gpu_hours = peak = 0.0
        migrations = hours = 0.0
        results, utilisations = [], []
        for model in models:
            sub = tuple(r for r in trace if r.model == model)
            if not sub:
                continue
            config = ClusterConfig(replica=ReplicaConfig(model=model, device=args.gpu), num_replicas=1,
                                   autoscale=True, max_replicas=args.max_replicas,
                                   target_ongoing_requests=args.target_ongoing, migration_policy=policy,
                                   migration_policy_options=options, seed=args.seed)
            cluster, result = run_fleet(sub, config, f"{policy} {model}")
            results.append(result)
            utilisations.append((kv_utilisation(cluster), result.gpu_hours))
            gpu_hours += result.gpu_hours
            peak += result.peak_gpus
            migrations += result.num_copies + result.num_recomputes
            hours = max(hours, result.hours)
        ttft = np.concatenate([r.ttft_s for r in results])
        attained = sum(r.attainment(slo) * r.num_requests for r in results) / sum(r.num_requests for r in results)
        utilisation = sum(u * w for u, w in utilisations) / sum(w for _, w in utilisations)
        totals[policy] = (gpu_hours, utilisation)
        rows.append((policy, f"{gpu_hours:.2f}", f"{gpu_hours / hours:.2f}", f"{peak:.0f}", f"{utilisation:.1%}",
                     f"{migrations / hours:.0f}", percentile_ms(ttft, 99), f"{attained:.1%}",
                     f"{sum(r.wall_s for r in results):.0f} s"))
    (base_gpu, base_util), (pack_gpu, pack_util) = totals["none"], totals["balance+pack"]
    print(source)
    print(table(f"SIMULATED Mell: {', '.join(models)} on {args.gpu}, Serve-style autoscaling, SLO {args.slo}",
                ("policy", "GPU-hours", "mean GPUs", "peak GPUs", "KV util", "migrations/h", "TTFT p99", "SLO",
                 "sim time"), rows))
    print(f"ours: balance+pack uses {(1 - pack_gpu / base_gpu):.1%} fewer GPU-hours and "
          f"{(pack_util / base_util - 1):+.1%} KV utilisation vs none")
    print(f"seed: {SEED}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    return 0
