"""KunServe's experiment: replicas of one model under a memory spike, with parameter dropping vs without vs
migration only (the `balance` migration policy, Llumnix-like).

    python -m loadtest.sim kunserve [--model llama-3-8b] [--gpu h100] [--replicas 2] [--memory-fraction 0.3]
                                    [--rate 0.3] [--factor 4] [--spike-at 30] [--spike-s 30] [--seconds 120]

`DroppingCluster` is the simulated cluster (loadtest/sim/cluster.py: the real schedulers, KV managers, pools,
router ranking and ClusterCore) plus KunServe's controller step: at every telemetry period it builds each
replica's `DropTelemetry` (from the same `ReplicaLoad` the deployed replicas report: `replica_load` over
`request_loads`, then `DropTelemetry.from_load`) and runs the deployed `plan_drops`
(deployments/cluster/drop_plan.py); its drop orders form a `SimPair` (loadtest/sim/pair.py: the engine's pair
bookkeeping, the pipeline's time from the cost model), its restore orders dissolve it. A request routed to a
replica of a dropped pair joins the pipeline (its home keeps it for streaming). A pair still dropped when the
last request finishes is restored then, so every run ends with full weights.

The spike (`SpikeTrace`): Poisson arrivals at `--rate` req/s, `--factor` times that for `--spike-s` seconds
from `--spike-at`; prompts log-normal around `--prompt-median` tokens (4K), outputs around
`--output-median` (2K). The pools are tight (`--memory-fraction` of the device: e.g. a GPU shared with
other work), so the spike's KV overflows them.
Reported: TTFT p50 / p99 of the requests that arrived during the spike, TPOT (mean and p99 over all
requests), goodput (requests meeting the SLO per second of the trace), drops, layers dropped, the
pipeline's bubble ratio, migrations. SIMULATED (docs/SIMULATOR.md); the seed's figure beside.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from deployments.cluster.drop_plan import DropOrder, DroppingConfig, DropState, DropTelemetry, PlanState, plan_drops
from deployments.telemetry import ReplicaStats, replica_load
from engine import migration as engine_migration
from engine.core.request import Request
from loadtest.sim.cluster import Cluster, ClusterConfig
from loadtest.sim.pair import PipelineOptions, SimPair
from loadtest.sim.plan import pool_plots
from loadtest.sim.registry import experiment
from loadtest.sim.replica import ReplicaConfig
from loadtest.sim.report import RunResult, Slo, summarize, table
from loadtest.sim.trace import SpikeTrace, TraceRequest

SEED = "KunServe (arXiv 2412.18169): up to 72.2x lower tail TTFT than Llumnix, vLLM and InferCept under spikes"


@dataclass
class DropLog:
    drops: list[tuple[float, DropOrder]] = field(default_factory=list)
    grows: list[tuple[float, DropOrder]] = field(default_factory=list)
    restores: list[float] = field(default_factory=list)
    bubble_ratios: list[float] = field(default_factory=list)
    carried: int = 0
    recomputed: int = 0
    weights: list[tuple[float, int]] = field(default_factory=list)  # (time, weight chunks held, all replicas)


class DroppingCluster(Cluster):
    def __init__(self, trace: tuple[TraceRequest, ...], config: ClusterConfig, dropping: DroppingConfig,
                 options: PipelineOptions = PipelineOptions()):
        super().__init__(trace, config)
        self.dropping = dropping
        self.options = options
        self.plan_state: PlanState | None = None
        self.pairs: dict[str, SimPair] = {}  # replica id -> its pair, while dropped
        self.log = DropLog()
        self._preemptions: dict[str, int] = {}

    def run(self) -> DroppingCluster:
        super().run()
        for pair in list(dict.fromkeys(self.pairs.values())):  # the trace ended while dropped
            self._restore(pair)
        return self

    def _add(self, live, request: Request) -> None:
        pair = self.pairs.get(live.replica.replica_id)
        if pair is None:
            super()._add(live, request)
            return
        pair.first.interrupt(self.now)
        pair.add(request, live.replica)
        self._kick(pair.first)

    def _telemetry(self) -> None:
        super()._telemetry()
        reports = [self._drop_telemetry(rid) for rid, live in self.live.items() if live.state == "active"]
        plan = plan_drops(reports, self.dropping, self.plan_state, self.now)
        self.plan_state = plan.state
        for order in plan.restores:
            self._restore(self.pairs[order.first])
        for order in plan.drops:
            self._drop(order)
        for order in plan.grows:
            self._grow(order)
        self.log.weights.append((self.now, sum(live.replica.engine.pool.num_held("weights")
                                               for live in self.live.values())))

    def _drop_telemetry(self, replica_id: str) -> DropTelemetry:
        live = self.live[replica_id]
        engine = live.replica.engine
        scheduler = engine.scheduler
        used, free = engine.kv.num_used_chunks(), engine.kv.num_available_chunks()
        stats = ReplicaStats(len(scheduler.running), len(scheduler.waiting), len(scheduler.swapped), used, free)
        load = replica_load(replica_id, stats, engine_migration.request_loads(engine), live.replica.started_at)
        new = scheduler.num_preemptions - self._preemptions.get(replica_id, 0)
        self._preemptions[replica_id] = scheduler.num_preemptions
        pair = self.pairs.get(replica_id)
        peer = None if pair is None else (pair.second if pair.first.replica_id == replica_id else pair.first)
        return DropTelemetry.from_load(
            load, engine.model.name, engine.model.num_layers, engine.chunks_per_layer, engine.kv_capacity_chunks(),
            num_new_preemptions=new,
            ttft_growth=self.live[replica_id].replica.ttft_growth(self.now),
            state=DropState.NORMAL if pair is None else DropState.DROPPED,
            peer=None if peer is None else peer.replica_id,
            dropped_layers=len(engine.dropped) // max(1, engine.chunks_per_layer))

    def _drop(self, order: DropOrder) -> None:
        first, second = self.live[order.first].replica, self.live[order.second].replica
        for replica in (first, second):
            replica.interrupt(self.now)
        pair = SimPair(first, second, order, self.options)
        pair.drop(max(self.now, first.clock, second.clock))
        self.pairs[order.first] = self.pairs[order.second] = pair
        self.log.drops.append((self.now, order))
        self._kick(first)
        self._kick(second)

    def _grow(self, order: DropOrder) -> None:
        pair = self.pairs[order.first]
        for replica in (pair.first, pair.second):
            replica.interrupt(self.now)
        pair.grow(order)  # unmapping: no stall, the chunks are KV's in the next step
        self.log.grows.append((self.now, order))
        self._kick(pair.first)
        self._kick(pair.second)

    def _restore(self, pair: SimPair) -> None:
        for replica in (pair.first, pair.second):
            replica.interrupt(self.now)
        self.log.bubble_ratios.append(pair.runner.bubble_ratio)
        pair.restore(max(self.now, pair.first.clock, pair.second.clock))
        self.log.carried += pair.num_carried
        self.log.recomputed += pair.num_recomputed
        del self.pairs[pair.first.replica_id], self.pairs[pair.second.replica_id]
        self.log.restores.append(self.now)
        self._kick(pair.first)
        self._kick(pair.second)


@dataclass(frozen=True)
class SpikeResult:
    label: str
    run: RunResult
    spike_ttft_s: np.ndarray
    goodput_per_s: float
    log: DropLog | None
    cluster: Cluster  # its timeline samples the pools every second (the balloon plot)


def run_variant(trace: tuple[TraceRequest, ...], spike: SpikeTrace, config: ClusterConfig, label: str,
                dropping: DroppingConfig | None, slo: Slo, options: PipelineOptions = PipelineOptions()) -> SpikeResult:
    started = time.perf_counter()
    if dropping is not None:
        cluster: Cluster = DroppingCluster(trace, config, dropping, options).run()
    else:
        cluster = Cluster(trace, config).run()
    result = summarize(cluster, label, time.perf_counter() - started)
    in_spike = np.array([spike.in_spike(record.trace.arrival_s) for record in cluster.records])
    met = (result.ttft_s <= slo.ttft_s) & (result.tpot_s <= slo.tpot_s)
    for live in cluster.live.values():  # every request finished: pools idle, weights whole again
        engine = live.replica.engine
        if not engine.is_idle() or engine.dropped or engine.pool.num_held("kv"):
            raise AssertionError(f"{label}: {live.replica.replica_id} did not end idle with all its weights")
    return SpikeResult(label, result, result.ttft_s[in_spike], float(met.sum()) / spike.seconds,
                       cluster.log if isinstance(cluster, DroppingCluster) else None, cluster)


def compare(spike: SpikeTrace, replica: ReplicaConfig, num_replicas: int, seed: int, slo: Slo,
            dropping: DroppingConfig, options: PipelineOptions = PipelineOptions(),
            cut: PipelineOptions | None = None) -> dict[str, SpikeResult]:
    """The three runs on one trace; with `cut` (the pipeline options with decode steps cut) a fourth beside."""
    trace = spike.generate(seed)
    config = ClusterConfig(replica=replica, num_replicas=num_replicas, seed=seed, sample_period_s=1.0)
    balance = replace(config, migration_policy="balance")
    results = {"none": run_variant(trace, spike, config, "none", None, slo),
               "migration": run_variant(trace, spike, balance, "migration (balance)", None, slo),
               "dropping": run_variant(trace, spike, config, "parameter dropping", dropping, slo, options)}
    if cut is not None:
        results["dropping-cut"] = run_variant(trace, spike, config, f"dropping, decode cut >= {cut.min_decode_rows}",
                                              dropping, slo, cut)
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--gpu", default="h100-80g")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--memory-fraction", type=float, default=0.3, help="of each device the engine takes")
    parser.add_argument("--rate", type=float, default=0.3, help="base arrivals per second (all replicas)")
    parser.add_argument("--factor", type=float, default=4.0, help="the spike's rate over the base rate")
    parser.add_argument("--spike-at", type=float, default=30.0)
    parser.add_argument("--spike-s", type=float, default=30.0)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--prompt-median", type=float, default=4096)
    parser.add_argument("--output-median", type=float, default=2048)
    parser.add_argument("--link", default="nvlink", choices=("nvlink", "pcie"))
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--min-micro-batch-tokens", type=int, default=64, help="the engine's default: 64")
    parser.add_argument("--min-decode-rows", type=int, default=0,
                        help="> 0: a fourth run beside, with decode steps cut into micro-batches of >= this many rows")
    parser.add_argument("--slo", default="ttft=2,tpot=0.1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="a folder: each run's pool balloons and TTFT CDF as PNGs")


def _kept(log: DropLog) -> str:
    """Each pair's layers kept when it formed and, if it grew, at its deepest: "31,2>22,10"."""
    pairs: list[list[DropOrder]] = []
    for _, order, is_drop in sorted([(t, o, True) for t, o in log.drops] + [(t, o, False) for t, o in log.grows],
                                    key=lambda event: (event[0], not event[2])):
        if is_drop:
            pairs.append([order])
        else:
            next(orders for orders in reversed(pairs) if orders[0].first == order.first).append(order)
    return "/".join(">".join(f"{o.first_keeps},{o.second_from}" for o in (orders[0], orders[-1])[:len(orders)])
                    for orders in pairs)


def _ms(values: np.ndarray, q: float) -> str:
    return f"{np.percentile(values, q) * 1e3:.0f}" if len(values) else "-"


@experiment("kunserve", "KunServe: parameter dropping vs none vs migration under a memory spike", _arguments)
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    spike = SpikeTrace(seconds=args.seconds, base_rate_per_s=args.rate, factor=args.factor, spike_at_s=args.spike_at,
                       spike_s=args.spike_s, prompt_median=args.prompt_median, output_median=args.output_median)
    replica = ReplicaConfig(model=args.model, device=args.gpu, gpu_memory_utilization=args.memory_fraction,
                            fuse_layers=False)
    slo = Slo.parse(args.slo)
    options = PipelineOptions(link=args.link, num_micro_batches=args.micro_batches,
                              min_micro_batch_tokens=args.min_micro_batch_tokens)
    cut = replace(options, min_decode_rows=args.min_decode_rows) if args.min_decode_rows > 0 else None
    results = compare(spike, replica, args.replicas, args.seed, slo, DroppingConfig(enabled=True), options, cut)
    base = results["none"]
    rows = []
    for result in results.values():
        run_, log = result.run, result.log
        p99 = np.percentile(result.spike_ttft_s, 99) if len(result.spike_ttft_s) else 0.0
        base_p99 = np.percentile(base.spike_ttft_s, 99) if len(base.spike_ttft_s) else 0.0
        rows.append((result.label, run_.num_requests, len(result.spike_ttft_s), _ms(result.spike_ttft_s, 50),
                     _ms(result.spike_ttft_s, 99), f"{base_p99 / p99:.1f}x" if p99 else "-",
                     f"{run_.tpot_s.mean() * 1e3:.1f}", _ms(run_.tpot_s, 99), f"{result.goodput_per_s:.2f}",
                     run_.num_preemptions, run_.num_copies + run_.num_recomputes,
                     (f"{len(log.drops)}+{len(log.grows)}" if log.grows else len(log.drops)) if log else "-",
                     _kept(log) if log and log.drops else "-",
                     f"{np.mean(log.bubble_ratios):.2f}" if log and log.bubble_ratios else "-"))
    title = (f"SIMULATED KunServe: {args.replicas} x {args.model} on {args.gpu} ({args.memory_fraction:.0%} of each "
             f"device), {args.rate:g} req/s, x{args.factor:g} for {args.spike_s:g} s from t={args.spike_at:g} s, "
             f"SLO {args.slo}, seed {args.seed}")
    print(table(title, ("run", "requests", "in spike", "spike TTFT p50 ms", "spike TTFT p99 ms", "p99 x none",
                        "TPOT mean ms", "TPOT p99 ms", "goodput req/s", "preempted", "migrations", "drops+grows",
                        "kept (first,from)", "bubble"), rows))
    print("kept (first,from): each drop order's first replica keeps layers [0, first), the second [from, L); "
          "a>b: as formed > at its deepest after growing")
    print(f"seed: {SEED}")
    if args.plot:
        for name, result in results.items():
            for path in pool_plots(result.cluster, result.run, Path(args.plot) / name, f"{result.label}, spike"):
                print(f"wrote {path}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    return 0
