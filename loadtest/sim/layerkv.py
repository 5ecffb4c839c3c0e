"""LayerKV's experiment: a burst of long prompts on a pool that holds only a few requests' whole KV,
`kv_offload: none` against `layerwise`.

    python -m loadtest.sim layerkv [--model llama-3-8b] [--gpu h100-80g] [--requests 32] [--prompts 2048,8192]
                                   [--output 1024] [--burst-s 0] [--kv-requests 4] [--slo ttft=10,tpot=0.1]

One replica (the engine's Scheduler, KVCacheManager and ElasticPool on the `sim` backend, the cost-model
executor; loadtest/sim/replica.py) serves `--requests` prompts of uniformly random lengths in `--prompts`
arriving uniformly within `--burst-s` seconds (0: all at once), `--output` tokens each. The pool is the
device's memory cut to the weights, the largest step's activations and `--kv-requests` whole requests of the
longest prompt (0: the whole device at 90%). `none` admits a prompt only when all its layers' KV fits;
`layerwise` runs the scheduler's offloading policy (engine/core/offload_policy.py): the top layers that do
not fit go to a `--host-gb` host buffer, are staged back one layer ahead for every step that reads them and
demoted / promoted as memory moves; the cost model charges those copies over PCIe, overlapped with compute
(loadtest/sim/cost.py). Both runs give the scheduler the same SLO targets (`--slo`). Reported: TTFT mean,
p50, p99, TPOT p50, p99, makespan, SLO attainment, and LayerKV's figures beside ours. Ours are SIMULATED.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from engine.model.llama import LlamaModel, ShardPlan
from loadtest.sim.cluster import Cluster, ClusterConfig
from loadtest.sim.hardware import GB, get_device
from loadtest.sim.models import get_model
from loadtest.sim.registry import experiment
from loadtest.sim.replica import DTYPE, ReplicaConfig
from loadtest.sim.report import RunResult, Slo, percentile_ms, summarize, table
from loadtest.sim.trace import TraceRequest

SEED = ("LayerKV (arXiv 2410.00428, v3): up to 69x lower mean TTFT and up to 28.7% fewer SLO violations than "
        "vLLM, 7B-70B models")


def burst_trace(num_requests: int, prompts: tuple[int, int], output: int, burst_s: float,
                seed: int) -> tuple[TraceRequest, ...]:
    """`num_requests` prompts of uniform lengths in `prompts`, arriving uniformly within `burst_s` seconds."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(prompts[0], prompts[1] + 1, num_requests)
    arrivals = np.sort(rng.uniform(0.0, burst_s, num_requests)) if burst_s > 0 else np.zeros(num_requests)
    return tuple(TraceRequest(float(a), int(n), output) for a, n in zip(arrivals, lengths, strict=True))


def replica_config(model: str, gpu: str, max_prompt: int, output: int, kv_requests: int, host_gb: float,
                   slo: Slo, kv_offload: str) -> ReplicaConfig:
    """A per-layer replica whose pool holds the weights, the largest step's activations and `kv_requests`
    whole requests of `max_prompt + output` tokens (0: the whole device at vLLM's 90%)."""
    context = -(-(max_prompt + output) // 1024) * 1024
    base = ReplicaConfig(model=model, device=gpu, max_model_len=context, max_num_seqs=256, fuse_layers=False,
                         kv_offload=kv_offload, host_buffer_bytes=int(host_gb * GB), ttft_slo_ms=slo.ttft_s * 1e3,
                         tpot_slo_ms=slo.tpot_s * 1e3)
    if kv_requests <= 0:
        return base
    spec, device = get_model(model), get_device(gpu)
    engine_model = spec.engine_config()
    activations = LlamaModel.plan_buffers(engine_model, ShardPlan.for_rank(engine_model, 0, 1), DTYPE,
                                          base.max_num_batched_tokens + base.max_num_seqs, base.max_num_seqs).num_bytes
    slack = 4 * base.granularity * spec.num_layers  # pages round up per layer and per balloon
    budget = spec.weight_bytes + activations + kv_requests * spec.kv_bytes_per_token * (max_prompt + output) + slack
    return replace(base, gpu_memory_utilization=min(0.9, budget / device.memory_bytes))


def run_one(trace: tuple[TraceRequest, ...], config: ReplicaConfig) -> tuple[RunResult, Cluster]:
    started = time.perf_counter()
    cluster = Cluster(trace, ClusterConfig(replica=config, num_replicas=1)).run()
    result = summarize(cluster, config.kv_offload, time.perf_counter() - started)
    engine = cluster.replicas[0].engine
    if not engine.is_idle() or len(result.ttft_s) != len(trace):
        raise AssertionError("the burst did not finish cleanly")
    return result, cluster


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--gpu", default="h100-80g")
    parser.add_argument("--requests", type=int, default=32, help="prompts in the burst")
    parser.add_argument("--prompts", default="2048,8192", help="min,max prompt tokens (uniform)")
    parser.add_argument("--output", type=int, default=1024, help="output tokens per request")
    parser.add_argument("--burst-s", type=float, default=0.0, help="arrivals spread over this long (0: at once)")
    parser.add_argument("--kv-requests", type=int, default=4,
                        help="the pool holds this many whole requests of the longest prompt (0: whole device)")
    parser.add_argument("--host-gb", type=float, default=256.0, help="host buffer for offloaded layers, GB")
    parser.add_argument("--slo", default="ttft=10,tpot=0.1", help="SLO targets (seconds; 'ms' suffix allowed)")
    parser.add_argument("--seed", type=int, default=0)


@experiment("layerkv", "LayerKV: TTFT and SLO attainment with layer-wise KV offloading, none vs layerwise",
            _arguments)
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    low, high = (int(value) for value in args.prompts.split(","))
    slo = Slo.parse(args.slo)
    trace = burst_trace(args.requests, (low, high), args.output, args.burst_s, args.seed)
    runs = {}
    for mode in ("none", "layerwise"):
        config = replica_config(args.model, args.gpu, high, args.output, args.kv_requests, args.host_gb, slo, mode)
        runs[mode] = run_one(trace, config)
    print(comparison_table(args, runs, slo))
    print(f"seed: {SEED}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    return 0


def comparison_table(args: argparse.Namespace, runs: dict[str, tuple[RunResult, Cluster]], slo: Slo) -> str:
    none, layerwise = runs["none"][0], runs["layerwise"][0]

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "-"

    def seconds(value: float) -> str:
        return f"{value:.1f} s"

    violations = [1 - result.attainment(slo) for result in (none, layerwise)]
    rows = [
        ("TTFT mean", seconds(none.ttft_s.mean()), seconds(layerwise.ttft_s.mean()),
         ratio(none.ttft_s.mean(), layerwise.ttft_s.mean()), "up to 69x lower"),
        ("TTFT p50", percentile_ms(none.ttft_s, 50), percentile_ms(layerwise.ttft_s, 50),
         ratio(np.percentile(none.ttft_s, 50), np.percentile(layerwise.ttft_s, 50)), "-"),
        ("TTFT p99", percentile_ms(none.ttft_s, 99), percentile_ms(layerwise.ttft_s, 99),
         ratio(np.percentile(none.ttft_s, 99), np.percentile(layerwise.ttft_s, 99)), "-"),
        ("TPOT p50", percentile_ms(none.tpot_s, 50), percentile_ms(layerwise.tpot_s, 50),
         ratio(np.percentile(none.tpot_s, 50), np.percentile(layerwise.tpot_s, 50)), "not worse"),
        ("TPOT p99", percentile_ms(none.tpot_s, 99), percentile_ms(layerwise.tpot_s, 99),
         ratio(np.percentile(none.tpot_s, 99), np.percentile(layerwise.tpot_s, 99)), "-"),
        ("makespan", seconds(none.hours * 3600), seconds(layerwise.hours * 3600),
         ratio(none.hours, layerwise.hours), "-"),
        (f"SLO attainment (TTFT {slo.ttft_s:g} s, TPOT {slo.tpot_s * 1e3:g} ms)", f"{1 - violations[0]:.1%}",
         f"{1 - violations[1]:.1%}", f"violations {violations[1] - violations[0]:+.1%}", "violations -28.7%"),
    ]
    rows += [(name, *values, "-", "-") for name, values in _mechanism_rows(runs)]
    title = (f"SIMULATED: none vs layerwise, {args.model} on {args.gpu}, {args.requests} prompts of "
             f"{args.prompts.replace(',', '-')} tokens in {args.burst_s:g} s, {args.output} output tokens, pool "
             f"KV for {args.kv_requests or 'a whole device of'} whole requests, {args.host_gb:g} GB host buffer")
    return table(title, ("", "none", "layerwise", "none / layerwise", "LayerKV (seed)"), rows)


def _mechanism_rows(runs: dict[str, tuple[RunResult, Cluster]]) -> list[tuple[str, tuple[str, str]]]:
    """What the scheduler did: batch reached, partial admissions, demotions, promotions, bytes staged."""
    columns = []
    for mode in ("none", "layerwise"):
        replica = runs[mode][1].replicas[0]
        scheduler, executor = replica.engine.scheduler, replica.engine.runner
        policy = scheduler.offload
        steps = max(replica.num_steps, 1)
        columns.append((str(replica.max_decode_batch), str(getattr(policy, "num_partial_admissions", 0)),
                        f"{getattr(policy, 'num_demotions', 0)} / {getattr(policy, 'num_promotions', 0)}",
                        f"{executor.bytes_fetched / steps / 2**20:.0f} MiB",
                        f"{executor.bytes_written_back / steps / 2**20:.2f} MiB", str(scheduler.num_preemptions),
                        str(replica.num_steps)))
    names = ("largest decode batch", "prompts admitted with host layers", "layer demotions / promotions",
             "host -> device per step (mean)", "device -> host per step (mean)", "preemptions", "steps")
    return [(name, (columns[0][i], columns[1][i])) for i, name in enumerate(names)]
