"""`python -m loadtest.bench.kunserve_spike`: a KV spike on two engines with tight pools, with and without
parameter dropping (engine level, one process; the Serve-level Locust benchmark needs the Serve wiring,
docs/KUNSERVE.md).

Both engines serve `--base` long requests each; then `--spike` more arrive at each at once. Without
dropping, each engine admits what its KV holds and queues the rest. With dropping, the drop plan
(deployments/cluster/drop_plan.py, hysteresis set to zero) sees the spike's KV demand and orders the pair
to drop as many layers as the deficit needs, the pair serves every request on the two-stage pipeline, and
the plan orders the restore once the demand fits the restored pools under the restore watermark.
Reported per run: TTFT of the spike requests (p50 / p99, ms and engine steps), TPOT (ms), KV capacity
and the weights balloon (chunks) before / during / after. The two runs produce the same tokens (checked).
"""

from __future__ import annotations

import argparse
import statistics
import time

from deployments.cluster.drop_plan import DroppingConfig, DropState, DropTelemetry, PlanState, plan_drops
from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.cooperative.carry import CarryPolicy
from engine.cooperative.pair import CooperativePair, PairState
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams


def tight_config(dtype: str, kv_tokens: int) -> EngineConfig:
    probe = LLMEngine(EngineConfig(dtype=dtype, num_threads=1, max_model_len=512, max_num_seqs=32,
                                   max_num_batched_tokens=256, device_memory_bytes=1 << 30, host_buffer_bytes=0))
    chunk = probe.pool.chunk_bytes
    kv_bytes = kv_tokens * 2 * probe.kv_spec.num_layers * probe.kv_spec.bytes_per_token
    budget = probe.pool.num_held("weights") * chunk + probe.peak_activation_bytes + kv_bytes
    probe.close()
    return EngineConfig(dtype=dtype, num_threads=1, max_model_len=512, max_num_seqs=32, max_num_batched_tokens=256,
                        device_memory_bytes=budget, host_buffer_bytes=0, preemption_mode="recompute",
                        enable_prefix_caching=False, enable_parameter_dropping=True)


PLAN = DroppingConfig(enabled=True, high_watermark=0.9, restore_watermark=0.6, max_drop_fraction=0.5,
                      drop_after_s=0.0, restore_after_s=0.0)


def telemetry(pair: CooperativePair, engine: LLMEngine, name: str, dropped: bool) -> DropTelemetry:
    """What the drop plan sees of one engine: KV demand in whole-model chunks of the requests homed there."""
    spec = engine.kv_spec
    scheduler = pair.first.scheduler if dropped else engine.scheduler
    used = waiting = 0
    for request in scheduler.requests.values():
        if dropped and pair.homes[request.request_id] is not engine:
            continue
        need = spec.num_pages(len(request.prompt_token_ids) + request.params.max_tokens) * 2 * spec.num_layers
        if request.num_computed_tokens:
            used += need
        else:
            waiting += need
    arena = engine.rank.arena
    return DropTelemetry(name, engine.model_name, engine.model_config.num_layers, arena.layer_chunks([0]),
                         engine.kv_capacity_chunks(), used, waiting,
                         state=DropState.DROPPED if dropped else DropState.NORMAL,
                         peer=("b" if name == "a" else "a") if dropped else None,
                         dropped_layers=len(arena.dropped_layers))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(pair: CooperativePair, prompts: list[list[int]], base: int, spike: int, max_tokens: int,
        drop: bool) -> dict:
    first, second = pair.first, pair.second
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tokens: dict[str, list[int]] = {}
    arrived: dict[str, tuple[float, int]] = {}
    first_token: dict[str, tuple[float, int]] = {}
    finished: dict[str, float] = {}
    steps = 0
    balloon = [first.pool.num_held("weights")]

    def add(request_id: str, home: LLMEngine, index: int) -> None:
        pair.add_request(GenerateRequest(request_id, tuple(prompts[index % len(prompts)]), params), home)
        arrived[request_id] = (time.perf_counter(), steps)

    def step() -> None:
        nonlocal steps
        for item in pair.step():
            out = item.output
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if out.request_id not in first_token and out.new_token_ids:
                first_token[out.request_id] = (time.perf_counter(), steps)
            if out.is_finished:
                finished[out.request_id] = time.perf_counter()
        steps += 1

    for index in range(base):
        add(f"base-a{index}", first, index)
        add(f"base-b{index}", second, index + 1)
    for _ in range(4):
        step()
    capacity = [first.kv_capacity_chunks()]
    for index in range(spike):
        add(f"spike-a{index}", first, index + 2)
        add(f"spike-b{index}", second, index + 3)
    orders = []

    def plan() -> None:
        dropped = pair.state is PairState.DROPPED
        replicas = [telemetry(pair, first, "a", dropped), telemetry(pair, second, "b", dropped)]
        decided = plan_drops(replicas, PLAN, PlanState(), 0.0)
        for order in decided.drops:
            orders.append(order)
            pair.drop(order.first_keeps, order.second_from)
            balloon.append(first.pool.num_held("weights"))
            capacity.append(first.kv_capacity_chunks())
        for order in decided.restores:
            orders.append(order)
            pair.restore()
            balloon.append(first.pool.num_held("weights"))

    if drop:
        plan()
    while pair.has_work:
        step()
        if drop and pair.state is PairState.DROPPED:
            plan()
    spiked = [rid for rid in arrived if rid.startswith("spike")]
    ttft_ms = [(first_token[r][0] - arrived[r][0]) * 1e3 for r in spiked]
    ttft_steps = [first_token[r][1] - arrived[r][1] for r in spiked]
    tpot_ms = [(finished[r] - first_token[r][0]) * 1e3 / (max_tokens - 1) for r in arrived]
    return {"orders": orders, "tokens": tokens, "ttft_ms": ttft_ms, "ttft_steps": ttft_steps, "tpot_ms": tpot_ms,
            "steps": steps, "balloon": balloon, "capacity": capacity, "bubble": pair.bubble_ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-tokens", type=int, default=640, help="KV each engine's pool holds")
    parser.add_argument("--base", type=int, default=2)
    parser.add_argument("--spike", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()
    config = tight_config(args.dtype, args.kv_tokens)
    first, second = LLMEngine(config), LLMEngine(config)
    text = "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    prompts = [first.tokenizer(f"Story {index}. " + text * 4).input_ids for index in range(16)]
    results = {}
    for drop in (False, True):
        pair = CooperativePair(first, second, carry=CarryPolicy("auto"))
        results[drop] = run(pair, prompts, args.base, args.spike, args.max_tokens, drop)
    same = results[False]["tokens"] == results[True]["tokens"]
    print(f"{first.model_name} {first.dtype}; pool {config.device_memory_bytes / 2**20:.0f} MiB per engine "
          f"(KV for {args.kv_tokens} tokens); {args.base} + {args.spike} spike requests per engine, prompts "
          f"{len(prompts[0])} tokens, {args.max_tokens} generated; {'same tokens' if same else 'TOKENS DIFFER'}")
    print("| run | TTFT p50 / p99 (ms) | TTFT p50 / p99 (steps) | TPOT mean (ms) | steps | KV chunks | "
          "weights chunks | bubble |")
    print("|---|---|---|---|---|---|---|---|")
    print("orders:", results[True]["orders"])
    for drop, r in results.items():
        print(f"| {'dropping' if drop else 'no dropping'} | {percentile(r['ttft_ms'], .5):.0f} / "
              f"{percentile(r['ttft_ms'], .99):.0f} | {percentile(r['ttft_steps'], .5)} / "
              f"{percentile(r['ttft_steps'], .99)} | {statistics.mean(r['tpot_ms']):.0f} | {r['steps']} | "
              f"{' -> '.join(map(str, r['capacity']))} | {' -> '.join(map(str, r['balloon']))} | "
              f"{r['bubble']:.2f} |")
    first.close()
    second.close()


if __name__ == "__main__":
    main()
