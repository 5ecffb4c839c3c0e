"""A burst of prompts arriving together, prefilled by the engine: what bounds the served TTFT p99 at high
concurrency (its first wave), and how much of a prefill step its matrix products take.

Part 1: `--prompts` requests of `--prompt-len` random tokens (max_tokens 1) are added at once and stepped to
their ends, `--rounds` times after one warm-up round: each round's step times, its total (the last first
token's time) and prompt tok/s. Part 2: the model's own products (its linear backend, its placed weights) on
`--max-num-batched-tokens` rows of random activations, every layer in turn as a step runs them (so weights
stream from memory): milliseconds and GFLOP/s per product kind, and their share of a full step of that many
tokens from part 1. Run it with OMP_WAIT_POLICY=PASSIVE on a shared box and quote the flags and load it prints.

    python -m loadtest.bench.prefill_burst [--prompts 32] [--prompt-len 129] [--rounds 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from loadtest.bench.serve import cpu_flags

PRODUCTS = ("qkv", "o", "gate_up", "down")  # a Llama-style layer's weights, in the order a step runs them


def burst(engine: LLMEngine, prompts: int, prompt_len: int, tag: str, rng: random.Random) -> list[float]:
    """Step times (s) of one burst of `prompts` prompts added together, each ending at its first token."""
    vocab = engine.model_config.vocab_size
    for index in range(prompts):
        tokens = tuple(rng.randrange(100, vocab) for _ in range(prompt_len))
        engine.add_request(GenerateRequest(f"{tag}-{index}", tokens, SamplingParams(max_tokens=1, temperature=0.0)))
    times = []
    while engine.has_work:
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    return times


def products(engine: LLMEngine, rows: int, rounds: int) -> tuple[dict[str, float], dict[str, tuple[int, int]], int]:
    """Median seconds per product kind summed over all layers, on `rows` rows (the model's linear backend and
    weights); the products' (in, out) sizes; the number of layers."""
    model = engine.runner.model
    layers = [layer for layer in model.layers if layer is not None]
    first = layers[0]
    shapes = {name: (first[name].shape[1], first[name].shape[0]) for name in PRODUCTS}  # weights are [out, in]
    inputs = {name: torch.randn(rows, shapes[name][0]).to(engine.dtype) for name in PRODUCTS}
    outputs = {name: torch.empty(rows, shapes[name][1], dtype=engine.dtype) for name in PRODUCTS}
    samples: dict[str, list[float]] = {name: [] for name in PRODUCTS}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            totals = dict.fromkeys(PRODUCTS, 0.0)
            for layer in layers:
                for name in PRODUCTS:
                    started = time.perf_counter()
                    model.linear(inputs[name], layer[name], outputs[name])
                    totals[name] += time.perf_counter() - started
            for name in PRODUCTS:
                samples[name].append(totals[name])
    return {name: statistics.median(values[1:]) for name, values in samples.items()}, shapes, len(layers)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench.prefill_burst", description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=129, help="129: loadtest.bench.serve's prompts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default=None, help="default: the engine's (embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-gib", type=float, default=2.0)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048, help="serve_config.yaml ships 2048")
    args = parser.parse_args(argv)
    print(f"flags: {cpu_flags()}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; {args.dtype}; "
          f"load average before {os.getloadavg()[0]:.2f}")
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                    device_memory_bytes=int(args.memory_gib * (1 << 30)), enable_prefix_caching=False,
                                    max_num_seqs=max(args.prompts, 1), max_model_len=max(256, args.prompt_len + 1),
                                    max_num_batched_tokens=args.max_num_batched_tokens))
    try:
        rng = random.Random(0)
        burst(engine, args.prompts, args.prompt_len, "warm-up", rng)
        full_steps = []
        for number in range(args.rounds):
            times = burst(engine, args.prompts, args.prompt_len, f"round{number}", rng)
            full_steps += times[:-1] if len(times) > 1 else times
            print(f"round {number}: steps {' + '.join(f'{t * 1e3:.0f}' for t in times)} ms = {sum(times) * 1e3:.0f} ms "
                  f"(the last first token), {args.prompts * args.prompt_len / sum(times):.0f} prompt tok/s", flush=True)
        per_kind, shapes, num_layers = products(engine, args.max_num_batched_tokens, args.rounds)
        step = statistics.median(full_steps)
        total = sum(per_kind.values())
        print(f"\nproducts of {args.max_num_batched_tokens} rows over {num_layers} layers (median of {args.rounds}):")
        print("| product | in x out | ms | GFLOP/s |")
        print("|---|---|---|---|")
        for name in PRODUCTS:
            flops = 2 * args.max_num_batched_tokens * shapes[name][0] * shapes[name][1] * num_layers
            print(f"| {name} | {shapes[name][0]} x {shapes[name][1]} | {per_kind[name] * 1e3:.0f} | "
                  f"{flops / per_kind[name] / 1e9:.0f} |")
        print(f"all products {total * 1e3:.0f} ms = {total / step:.0%} of a burst's full step ({step * 1e3:.0f} ms, "
              f"median); load average after {os.getloadavg()[0]:.2f}")
    finally:
        engine.close()


if __name__ == "__main__":
    main()
