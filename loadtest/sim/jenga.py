"""Jenga's experiment: heterogeneous KV in one device's pool, the LCM allocator against padding every kind
to the largest page (vLLM's hybrid KV cache manager) and a static partition per kind, at one budget.

    python -m loadtest.sim jenga [--gpu h100] [--model gemma-3-12b] [--mix gemma-3-12b,llama-3-8b]
                                 [--requests 400] [--seed 0]

Each run is one device (`SharedDevice`): the models' weights in the pool's `weights` balloon, one KV
manager per model (`KVCacheManager` with the `bookkeeping-paged` layout: the `paged` layout's decisions,
blocks are small pages of the LCM allocator) attached to one `KVBalloon`, one activation workspace, and
each model's own engine `Scheduler`; the device runs one step at a time, taking the models in turn.
Every request is queued at t=0 and the run goes to the end. A layer group is a kind (Gemma 3: its global
and its sliding layers; a second model: its own kinds), its small page one block of the group
(2 x layers x a 2 MiB page of one layer's K, as the engine sizes pages on CUDA). Allocators, by
memory/page_policies.py name: `lcm`, `pad_to_largest`, `static_partition` (each kind's share of the KV
budget proportional to its demand in the workload the split was planned on: its best static split).

Workloads: the Gemma-3-class model alone with long prompts; two models in one pool, 1:1; and the same two
models with the traffic shifted to 3:1 after the static split was planned on 1:1.
Reported: the most requests running at once, the mean, KV in use over KV held (the allocator's small
pages in use / large pages held, time-averaged: Jenga's memory utilisation; and the tokens' own K/V bytes
over held, which also counts the unfilled tail of each request's last page), output tokens/s over the
makespan, preemptions. SIMULATED: the cost model times the steps (docs/SIMULATOR.md).
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from loadtest.sim.device import DeviceLoop
from loadtest.sim.registry import experiment
from loadtest.sim.replica import ReplicaConfig, SharedDevice, SimReplica, kv_spec_for, sim_request
from loadtest.sim.report import table
from memory.kv.cache_policy import policy_for
from memory.page_policies import StaticPartition

SEED = ("Jenga (arXiv 2503.18292): GPU memory utilisation up to +79.6%, throughput up to 4.92x (1.80x on "
        "average) vs vLLM")
ALLOCATORS = ("lcm", "pad_to_largest", "static_partition")

Workload = list[tuple[str, int, int]]  # (model, prompt tokens, output tokens) per request


@dataclass(frozen=True)
class BatchResult:
    allocator: str
    num_requests: int
    max_running: int
    mean_running: float
    page_utilisation: float  # small pages in use / large pages held (requested bytes over held bytes)
    token_utilisation: float  # the stored tokens' K/V bytes / held bytes
    output_tokens_per_s: float
    makespan_s: float
    num_preemptions: int
    finish_s: tuple[float, ...] = ()  # per request, in workload order


def workload(models: Sequence[str], num: int, prompts: tuple[int, int], outputs: tuple[int, int], seed: int,
             every: int = 1) -> Workload:
    """`num` requests; with two models, every `every + 1`-th goes to the first and the others to the second
    (every=1: 1:1)."""
    rng = random.Random(seed)
    requests = []
    for index in range(num):
        model = models[0] if len(models) == 1 or index % (every + 1) == 0 else models[1]
        requests.append((model, rng.randint(*prompts), rng.randint(*outputs)))
    return requests


def kind_demand(configs: Sequence[ReplicaConfig], requests: Workload) -> dict[str, float]:
    """Bytes each kind (owner/g<i>, the KV balloon's names) holds for the workload's requests at full length."""
    demand: dict[str, float] = {}
    for config in configs:
        spec = kv_spec_for(config)
        for group_index, group in enumerate(spec.groups):
            policy = policy_for(group, spec.tokens_per_page)
            block = 2 * len(group.layers) * spec.page_bytes
            demand[f"{config.model}/g{group_index}"] = float(sum(
                len(policy.resident_pages(prompt + output)) * block for model, prompt, output in requests
                if model == config.model))
    return demand


def partition(configs: Sequence[ReplicaConfig], planned: Workload):
    """The static split planned on `planned`: each kind's share of the KV budget by its demand."""
    demand = kind_demand(configs, planned)
    total = sum(demand.values())
    shares = {kind: value / total for kind, value in demand.items()}
    return lambda budget_chunks: StaticPartition(shares, budget_chunks)


def _stored_bytes(replica: SimReplica) -> int:
    """K/V bytes of the tokens the replica's requests hold (each group: the tokens its policy keeps)."""
    kv = replica.engine.kv
    spec = kv.spec
    total = 0
    for state in kv.requests.values():
        for group in spec.groups:
            tokens = state.num_tokens if group.sliding_window is None else min(state.num_tokens, group.sliding_window)
            total += tokens * 2 * len(group.layers) * spec.bytes_per_token
    return total


def run_batch(configs: Sequence[ReplicaConfig], requests: Workload, page_policy, label: str) -> BatchResult:
    """Every request queued at t=0 on one device shared by `configs`' models, run to the end; checks that
    every request finished exactly once and the device ends idle."""
    shared = SharedDevice(configs, page_policy)
    finishes: Counter[str] = Counter()
    finish_s: dict[str, float] = {}

    def on_finish(request, when: float) -> None:
        finishes.update([request.request_id])
        finish_s[request.request_id] = when

    lanes = [SimReplica(config.model, config, 0.0, on_finish, shared) for config in configs]
    by_model = {lane.replica_id: lane for lane in lanes}
    for index, (model, prompt, output) in enumerate(requests):
        by_model[model].add(sim_request(f"r{index}", prompt, output, 0.0))
    totals = dict.fromkeys(("seconds", "running", "pages", "tokens"), 0.0)
    max_running = 0

    def observe(seconds: float) -> None:
        nonlocal max_running
        held = used = 0
        for kind in shared.balloon.telemetry().values():
            held, used = held + kind.bytes_held, used + kind.bytes_used
        running = sum(len(lane.engine.scheduler.running) for lane in lanes)
        max_running = max(max_running, running)
        totals["seconds"] += seconds
        totals["running"] += running * seconds
        if held:
            totals["pages"] += used / held * seconds
            totals["tokens"] += sum(_stored_bytes(lane) for lane in lanes) / held * seconds

    now = DeviceLoop(lanes, observe).run()
    if len(finishes) != len(requests) or set(finishes.values()) != {1}:
        raise AssertionError(f"{label}: a request finished other than exactly once")
    for lane in lanes:
        if not lane.engine.is_idle():
            raise AssertionError(f"{label}: {lane.replica_id} is not idle at the end")
    if shared.pool.num_held(shared.balloon.client) or any(kind.num_large_pages
                                                          for kind in shared.balloon.telemetry().values()):
        raise AssertionError(f"{label}: the KV balloon still holds pages at the end")
    weight = totals["seconds"]
    result = BatchResult(label, len(requests), max_running, totals["running"] / weight, totals["pages"] / weight,
                         totals["tokens"] / weight, sum(output for _, _, output in requests) / now, now,
                         sum(lane.engine.scheduler.num_preemptions for lane in lanes),
                         tuple(finish_s[f"r{index}"] for index in range(len(requests))))
    for lane in lanes:
        lane.engine.close()
    shared.close()
    return result


def compare(configs: Sequence[ReplicaConfig], requests: Workload, planned: Workload | None = None,
            allocators: Sequence[str] = ALLOCATORS) -> dict[str, BatchResult]:
    """The workload under each allocator, at one budget (static partition planned on `planned`)."""
    results = {}
    for name in allocators:
        policy = partition(configs, planned or requests) if name == "static_partition" else name
        results[name] = run_batch(configs, requests, policy, name)
    return results


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", default="h100-80g")
    parser.add_argument("--model", default="gemma-3-12b", help="the Gemma-3-class model served alone")
    parser.add_argument("--mix", default="gemma-3-12b,llama-3-8b", help="two models sharing one device's pool")
    parser.add_argument("--requests", type=int, default=400, help="requests per run")
    parser.add_argument("--prompts", default="4096,16384", help="prompt lengths: low,high (uniform)")
    parser.add_argument("--outputs", default="256,1024", help="output lengths: low,high (uniform)")
    parser.add_argument("--max-model-len", type=int, default=32768)
    parser.add_argument("--seed", type=int, default=0)


def _pair(text: str) -> tuple[int, int]:
    low, high = (int(value) for value in text.split(","))
    return low, high


@experiment("jenga", "Jenga: LCM allocator vs padding to the largest page vs static partition (heterogeneous KV)",
            _arguments)
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    prompts, outputs = _pair(args.prompts), _pair(args.outputs)

    def configs(models: Sequence[str]) -> list[ReplicaConfig]:
        return [ReplicaConfig(model=model, device=args.gpu, max_model_len=args.max_model_len, fuse_layers=False,
                              kv_layout="bookkeeping-paged") for model in models]

    mix = args.mix.split(",")
    planned = workload(mix, args.requests, prompts, outputs, args.seed)
    runs = [(f"{args.model}", configs([args.model]), workload([args.model], args.requests, prompts, outputs,
                                                               args.seed), None),
            (f"{mix[0]} + {mix[1]}, 1:1", configs(mix), planned, None),
            (f"{mix[0]} + {mix[1]}, 1:3 (split planned 1:1)", configs(mix),
             workload(mix, args.requests, prompts, outputs, args.seed, every=3), planned)]
    rows = []
    for name, device_configs, requests, plan in runs:
        results = compare(device_configs, requests, plan)
        base = results["pad_to_largest"]
        for allocator, result in results.items():
            rows.append((name if allocator == ALLOCATORS[0] else "", allocator, result.num_requests, result.max_running,
                         f"{result.mean_running:.1f}", f"{result.max_running / base.max_running:.2f}x",
                         f"{result.page_utilisation:.1%}", f"{result.token_utilisation:.1%}",
                         f"{result.output_tokens_per_s:.0f}",
                         f"{result.output_tokens_per_s / base.output_tokens_per_s:.2f}x", result.num_preemptions))
    title = (f"SIMULATED Jenga: heterogeneous KV on one {args.gpu} (90% of its memory), all requests queued at t=0, "
             f"prompts {prompts[0]}-{prompts[1]}, outputs {outputs[0]}-{outputs[1]} tokens, seed {args.seed}")
    print(table(title, ("workload", "allocator", "requests", "max running", "mean running", "max x pad",
                        "pages used/held", "tokens/held", "output tok/s", "tok/s x pad", "preempted"), rows))
    print("pages used/held: the allocator's small pages in use over the large pages it holds (time-averaged); "
          "tokens/held: the stored tokens' K/V bytes over held (a page is 512-1024 tokens on 2 MiB granules)")
    print(f"seed: {SEED}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    return 0
