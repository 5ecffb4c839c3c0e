"""eLLM's experiment: the elastic pool against a static KV / activation split at 32K-128K-token inputs.

    python -m loadtest.sim ellm [--model llama-3-8b] [--gpu h100] [--inputs 32768,65536,131072]

One replica serves a batch of identical long requests (all queued at t=0, `--output` tokens each, prompts
prefilled whole: `max_num_batched_tokens` = the context, as a long-context server without chunked prefill
runs). The static baseline (vLLM's partition) reserves activation memory for the largest step it may
plan, for the whole run; the elastic pool (ours, eLLM's design) lends that memory to the KV cache whenever
no prefill needs it. Reported: the largest decode batch reached, decode throughput (decode-only steps) and
end-to-end output throughput (tokens over the makespan). The seed's figures are printed beside ours; they
were measured on GPUs with eLLM's full design (including CPU offloading of KV), ours are SIMULATED from the
real scheduler and pool with the cost model (docs/SIMULATOR.md explains why 128K shows no gain here).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from loadtest.sim.registry import experiment
from loadtest.sim.replica import ReplicaConfig, SimReplica, sim_request
from loadtest.sim.report import table

SEED = "eLLM (2025): up to 3x batch size and 2.32x decode throughput vs vLLM at 128K-token inputs"


def run_batch(config: ReplicaConfig, num_requests: int, prompt: int, output: int) -> dict[str, float]:
    """All requests at t=0 on one replica, to the end. Returns max batch, output tok/s, makespan."""
    finished: list[float] = []
    replica = SimReplica("ellm", config, 0.0, lambda request, when: finished.append(when))
    for index in range(num_requests):
        replica.add(sim_request(f"r{index}", prompt, output, 0.0))
    now = 0.0
    while (end := replica.start(now)) is not None:
        replica.complete()
        now = end
    if len(finished) != num_requests or not replica.engine.is_idle():
        raise AssertionError("the batch did not finish cleanly")
    replica.engine.close()
    return {"max_batch": replica.max_decode_batch, "tokens_per_s": num_requests * output / now, "makespan_s": now,
            "decode_tokens_per_s": replica.decode_only_tokens / replica.decode_only_s}


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--gpu", default="h100-80g")
    parser.add_argument("--inputs", default="32768,65536,131072", help="prompt lengths, comma-separated")
    parser.add_argument("--output", type=int, default=256, help="output tokens per request")
    parser.add_argument("--requests", type=int, default=0, help="requests per run (0: enough to fill the device)")


@experiment("ellm", "eLLM: elastic pool vs static KV/activation split at 32K-128K inputs", _arguments)
def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    inputs = [int(value) for value in args.inputs.split(",")]
    context = max(inputs) + args.output
    context = -(-context // 1024) * 1024
    base = ReplicaConfig(model=args.model, device=args.gpu, max_model_len=context, max_num_batched_tokens=context,
                         max_num_seqs=64)
    rows = []
    for prompt in inputs:
        kv_per_request = base_replica_kv_bytes(base, prompt + args.output)
        num = args.requests or max(4, int(3 * base_free_bytes(base) / kv_per_request) + 1)
        static = run_batch(replace(base, pool_policy="static"), num, prompt, args.output)
        elastic = run_batch(base, num, prompt, args.output)
        rows.append((f"{prompt // 1024}K", num, static["max_batch"], elastic["max_batch"],
                     f"{elastic['max_batch'] / static['max_batch']:.2f}x" if static["max_batch"] else "-",
                     f"{static['decode_tokens_per_s']:.0f}", f"{elastic['decode_tokens_per_s']:.0f}",
                     f"{elastic['decode_tokens_per_s'] / static['decode_tokens_per_s']:.2f}x",
                     f"{elastic['tokens_per_s'] / static['tokens_per_s']:.2f}x",
                     "3x / 2.32x" if prompt >= 131072 else "-"))
    title = (f"SIMULATED eLLM: {args.model} on {args.gpu}, elastic pool vs static split (activations reserved for "
             f"a {context // 1024}K-token step), {args.output} output tokens")
    print(table(title, ("input", "requests", "batch static", "batch elastic", "batch x", "decode tok/s static",
                        "decode tok/s elastic", "decode x", "end-to-end x", "seed (batch / decode)"), rows))
    print("decode tok/s: tokens of decode-only steps over their time; end-to-end: all output tokens over the "
          "makespan (whole-prompt prefills included)")
    print(f"seed: {SEED}")
    print(f"simulated in {time.perf_counter() - started:.1f} s")
    return 0


def base_free_bytes(config: ReplicaConfig) -> float:
    from loadtest.sim.hardware import get_device
    from loadtest.sim.models import get_model

    return get_device(config.device).memory_bytes * config.gpu_memory_utilization - get_model(config.model).weight_bytes


def base_replica_kv_bytes(config: ReplicaConfig, num_tokens: int) -> float:
    from loadtest.sim.models import get_model

    return get_model(config.model).kv_bytes_per_token * num_tokens
