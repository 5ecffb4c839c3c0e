"""Burst mode of the offline benchmark: long prompts all at once on a pool that holds only a few
requests' whole KV, with `kv_offload: none` (a prompt waits until all its KV fits) against
`kv_offload: layerwise` (LayerKV: it starts with its top layers' KV on the host), in one run.

    python -m loadtest.offline --mode burst [--num-prompts 8] [--prompt-len 2048] [--output-len 64]
        [--kv-requests 2] [--ttft-slo-ms 20000] [--tpot-slo-ms 400] [--threads 2] [--dtype auto]
        [--systems none,layerwise:in_place,layerwise:copy] [--plot docs/layerkv-burst-memory.png] [--json OUT]

The device budget is the weights + one full step's activations + `kv-requests` requests' whole KV
(prompt + output), measured on a probe engine. Reported per system: TTFT p50/p99, TPOT p50/p99,
makespan, SLO attainment (TTFT and mean TPOT within the targets), preemptions, mean bytes staged
from the host per step, peak (request, layer) pairs on the host, and whether the greedy tokens equal
the first system's. The plot shows device vs host KV bytes over time for each system.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Sequence

import torch

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.sampling_workspace import SampledRows
from loadtest.offline.engine_runner import MIB, greedy, make_prompts
from loadtest.offline.tables import format_table, load_average

GIB = 1 << 30


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def engine_config(args, budget: int, system: str) -> EngineConfig:
    offload, _, staging = system.partition(":")
    return EngineConfig(dtype=args.dtype, num_threads=args.threads, device_memory_bytes=budget,
                        host_buffer_bytes=int(args.host_gib * GIB), enable_prefix_caching=False,
                        max_model_len=args.prompt_len + args.output_len + 16, max_num_seqs=args.num_prompts,
                        max_num_batched_tokens=args.max_num_batched_tokens, kv_offload=offload,
                        kv_staging=staging or "auto", ttft_slo_ms=args.ttft_slo_ms, tpot_slo_ms=args.tpot_slo_ms)


def probe_budget(args) -> tuple[int, object]:
    """Weights + a full step's activations + `kv_requests` whole requests' KV, in bytes."""
    probe = LLMEngine(engine_config(args, 4 * GIB, "none"))
    try:
        chunk = probe.pool.chunk_bytes
        weights = probe.pool.num_held("weights")
        activations = probe.runner.activation_chunks(args.max_num_batched_tokens + args.num_prompts,
                                                     SampledRows.plain(args.num_prompts))
        per_request = probe.kv.chunks_to_grow(None, args.prompt_len + args.output_len + 1)
        return (weights + activations + args.kv_requests * per_request + 2) * chunk, probe.tokenizer
    finally:
        probe.close()


def run_burst_system(engine: LLMEngine, prompts: Sequence[Sequence[int]], output_len: int) -> dict:
    """Submits every prompt at once and steps to the end; per-request latencies and per-step memory."""
    before = engine.stats()
    started = time.monotonic()
    ids = [f"b{index}" for index in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(GenerateRequest(request_id, tuple(prompt), greedy(output_len), arrival_time=started))
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    tokens: dict[str, list[int]] = {request_id: [] for request_id in ids}
    timeline = []  # (s, device KV bytes, host KV bytes)
    fetched, steps, peak_offloaded = [], 0, 0
    chunk = engine.pool.chunk_bytes
    while engine.has_work:
        outputs = engine.step()
        now = time.monotonic()
        steps += 1
        stats = engine.stats()
        fetched.append(stats.kv_bytes_fetched_last_step)
        peak_offloaded = max(peak_offloaded, stats.kv_offloaded_layers)
        in_tier = engine.kv.host_tier.num_used if engine.kv.host_tier is not None else 0
        timeline.append((now - started, engine.pool.num_held("kv") * chunk,  # host: offloaded + swapped
                         engine.kv.host_buffer.used_bytes + in_tier * chunk))
        for output in outputs:
            first.setdefault(output.request_id, now)
            last[output.request_id] = now
            tokens[output.request_id].extend(output.new_token_ids)
    makespan = time.monotonic() - started
    ttfts = [(first[r] - started) * 1e3 for r in ids]
    tpots = [(last[r] - first[r]) * 1e3 / max(1, len(tokens[r]) - 1) for r in ids]
    stats = engine.stats()
    return {
        "ttft_p50_ms": _percentile(ttfts, 50), "ttft_p99_ms": _percentile(ttfts, 99),
        "tpot_p50_ms": _percentile(tpots, 50), "tpot_p99_ms": _percentile(tpots, 99),
        "makespan_s": makespan,
        "slo_attainment": (stats.slo_attained - before.slo_attained) / max(1, stats.slo_finished - before.slo_finished),
        "preemptions": stats.num_preemptions - before.num_preemptions, "steps": steps,
        "fetched_mib_per_step": sum(fetched) / max(1, steps) / MIB, "peak_offloaded_layers": peak_offloaded,
        "tokens": tokens, "timeline": timeline, "load": load_average(),
    }


def plot_timelines(results: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 1, figsize=(8, 2.6 * len(results)), sharex=True, squeeze=False)
    for axis, (system, result) in zip(axes[:, 0], results.items(), strict=True):
        seconds = [point[0] for point in result["timeline"]]
        axis.stackplot(seconds, [p[1] / MIB for p in result["timeline"]], [p[2] / MIB for p in result["timeline"]],
                       labels=("device KV", "host KV"), colors=("#4477aa", "#ee8866"))
        axis.set_title(f"kv_offload {system}", fontsize=10)
        axis.set_ylabel("MiB")
        axis.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel("seconds since the burst")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def format_burst(results: dict[str, dict], args, budget: int) -> str:
    keys = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "makespan_s", "slo_attainment",
            "preemptions", "steps", "fetched_mib_per_step", "peak_offloaded_layers")
    systems = list(results)
    rows = [["", *systems]]
    for key in keys:
        rows.append([key, *(f"{results[s][key]:.3g}" if isinstance(results[s][key], float) else str(results[s][key])
                            for s in systems)])
    base = results[systems[0]]
    rows.append([f"TTFT p99: {systems[0]} / this", *(f"{base['ttft_p99_ms'] / results[s]['ttft_p99_ms']:.2f}x"
                                                     for s in systems)])
    rows.append([f"makespan: this / {systems[0]}", *(f"{results[s]['makespan_s'] / base['makespan_s']:.2f}x"
                                                     for s in systems)])
    rows.append([f"greedy tokens equal {systems[0]}'s", *(
        f"{sum(results[s]['tokens'][r] == base['tokens'][r] for r in base['tokens'])}/{len(base['tokens'])}"
        for s in systems)])
    header = (f"== burst: {args.num_prompts} prompts x {args.prompt_len} in / {args.output_len} out at once; "
              f"pool {budget / MIB:.0f} MiB (weights + a step's activations + {args.kv_requests} requests' KV); "
              f"SLO TTFT {args.ttft_slo_ms} ms, TPOT {args.tpot_slo_ms} ms; {args.threads} threads, "
              f"OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    loads = "; ".join(f"{s}: {results[s]['load']}" for s in systems)
    return "\n".join([header, format_table(rows), loads])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.offline --mode burst",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--kv-requests", type=int, default=2, help="whole requests' KV the pool holds")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--ttft-slo-ms", type=float, default=20000.0)
    parser.add_argument("--tpot-slo-ms", type=float, default=400.0)
    parser.add_argument("--host-gib", type=float, default=2.0)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--systems", default="none,layerwise:in_place,layerwise:copy")
    parser.add_argument("--plot", default=None, help="write the device/host KV plot here (png)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.threads = args.threads or torch.get_num_threads()
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    budget, tokenizer = probe_budget(args)
    prompts = make_prompts(tokenizer, args.num_prompts, args.prompt_len, args.seed)
    results = {}
    for system in args.systems.split(","):
        engine = LLMEngine(engine_config(args, budget, system), tokenizer=tokenizer)
        try:
            run_burst_system(engine, prompts[:1], 2)  # warm-up (kernels built, pages touched)
            results[system] = run_burst_system(engine, prompts, args.output_len)
        finally:
            engine.close()
        summary = {key: value for key, value in results[system].items() if key not in ("tokens", "timeline")}
        print(f"{system}: {summary}", flush=True)  # each system's numbers as soon as it is done
    print(format_burst(results, args, budget), flush=True)
    if args.plot:
        plot_timelines(results, args.plot)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump({"config": vars(args), "budget": budget, "results": results}, handle, indent=1, default=str)
    return results
