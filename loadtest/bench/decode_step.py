"""Decode steps of the engine side by side: the fused decode step (engine/model/decode_step.py) against the
per-op path, at several batch sizes, in one process.

For each batch size B, B requests of `--prompt-len` tokens are prefilled, then `--steps` pure decode steps
are timed (`LLMEngine.step`, wall and this process's CPU time), the two paths alternating step by step
(the per-op path by setting the model's `decode_step` to None), after `--warmup` steps of each. The table
shows medians and the ratio; run it with OMP_WAIT_POLICY=PASSIVE on a shared box and quote the load average
it prints.

    python -m loadtest.bench.decode_step [--batches 1 8 32 64] [--steps 20] [--dtype bfloat16]

`--closed-loop C` instead runs what a served load at concurrency C runs, at the engine: C users, each sending
`--requests-per-user` requests one after another (as loadtest.bench.serve's client does), the two paths
alternating per step, and prints each step shape (pure decode rows; or decode rows + prompt tokens) with its
count and median time per path: which steps the load makes, and what each path costs on them, then the run's
output tok/s, TTFT p50 / p99 (from a request's submission to the step that gave its first token) and the engine
thread's CPU time over the steps' wall time (below 1 when its OpenMP partner keeps it waiting, e.g. because
another process took a core). With `--engine-path` every step takes the path the engine would (no alternation):
the numbers the served closed loop at concurrency C compares with.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from loadtest.metrics import percentile


def _time_steps(engine: LLMEngine, paths: dict, steps: int, warmup: int) -> dict[str, dict[str, list[float]]]:
    model = engine.runner.model
    times = {name: {"wall": [], "cpu": []} for name in paths}
    for index in range((warmup + steps) * len(paths)):
        name = list(paths)[index % len(paths)]
        model.decode_step = paths[name]
        wall, cpu = time.perf_counter(), time.process_time()
        engine.step()
        if index >= warmup * len(paths):
            times[name]["wall"].append(time.perf_counter() - wall)
            times[name]["cpu"].append(time.process_time() - cpu)
    return times


def measure(batch: int, args) -> dict[str, dict[str, float]]:
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                    device_memory_bytes=int(args.memory_gib * (1 << 30)), enable_prefix_caching=False,
                                    max_num_seqs=max(batch, 1)))
    try:
        fused = engine.runner.model.decode_step
        paths = {"fused": fused, "per-op": None} if fused is not None else {"per-op": None}
        total_steps = (args.warmup + args.steps) * len(paths) + 2
        params = SamplingParams(temperature=0.0, max_tokens=total_steps, ignore_eos=True)
        vocab = engine.runner.model.config.vocab_size
        for index in range(batch):  # distinct prompts: nothing shared between requests
            prompt = tuple((1000 + 7 * index + 13 * t) % vocab for t in range(args.prompt_len))
            engine.add_request(GenerateRequest(f"b{batch}-{index}", prompt, params))
        while any(request.num_computed_tokens < len(request.prompt_token_ids) for request in engine.scheduler.running) \
                or engine.scheduler.waiting:
            engine.step()  # prefill (and the first decode rows riding with it)
        times = _time_steps(engine, paths, args.steps, args.warmup)
        return {name: {kind: statistics.median(values) * 1e3 for kind, values in series.items()}
                for name, series in times.items()}
    finally:
        engine.close()


def closed_loop(users: int, args) -> None:
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                    device_memory_bytes=int(args.memory_gib * (1 << 30)), enable_prefix_caching=False,
                                    max_num_seqs=max(users, 1), max_num_batched_tokens=args.max_num_batched_tokens))
    try:
        model = engine.runner.model
        fused = model.decode_step
        # what the served client sends (loadtest/openai_stream.py): min_tokens as well as ignore_eos
        params = SamplingParams(temperature=0.0, max_tokens=args.output_len, min_tokens=args.output_len,
                                ignore_eos=True)
        vocab = model.config.vocab_size
        plans, sent = [], [0] * users
        engine.scheduler.plan_observers.append(plans.append)

        submitted: dict[str, float] = {}  # request id -> when it was added (TTFT)

        def submit(user: int) -> None:
            index = user * args.requests_per_user + sent[user]
            prompt = tuple((1000 + 7 * index + 13 * t) % vocab for t in range(args.prompt_len))
            request_id = f"u{user}-{sent[user]}"
            submitted[request_id] = time.perf_counter()
            engine.add_request(GenerateRequest(request_id, prompt, params))
            sent[user] += 1

        for user in range(users):
            submit(user)
        times: dict[tuple[str, str], list[float]] = {}
        step, step_wall, step_cpu, tokens = 0, 0.0, 0.0, 0
        first_token: dict[str, float] = {}
        run_started = time.perf_counter()
        while engine.has_work:
            path = "fused" if fused is not None and (args.engine_path or step % 2 == 0) else "per-op"
            model.decode_step = fused if path == "fused" else None
            started, cpu = time.perf_counter(), time.thread_time()
            outputs = engine.step()
            elapsed = time.perf_counter() - started
            step_wall += elapsed
            step_cpu += time.thread_time() - cpu
            step += 1
            plan = plans[-1] if plans else None
            plans.clear()
            if plan is not None and not plan.is_empty:
                prompt_tokens = sum(len(chunk.token_ids) for chunk in plan.prefills)
                shape = (f"decode {len(plan.decodes)}" if not prompt_tokens
                         else f"mixed {len(plan.decodes)} + {prompt_tokens}")
                times.setdefault((shape, path), []).append(elapsed)
            for output in outputs:
                user = int(output.request_id[1:].split("-")[0])
                tokens += len(output.new_token_ids)
                if output.new_token_ids and output.request_id not in first_token:
                    first_token[output.request_id] = time.perf_counter() - submitted[output.request_id]
                if output.is_finished and sent[user] < args.requests_per_user:
                    submit(user)
        elapsed_run = time.perf_counter() - run_started
        model.decode_step = fused
        print(f"closed loop, {users} users x {args.requests_per_user} requests, {args.prompt_len}/{args.output_len}:")
        print("| step shape (mixed steps run per-op either way) | steps fused on / off | median ms fused on / off |")
        print("|---|---|---|")
        for shape in sorted({shape for shape, _ in times}, key=lambda text: (text[0], len(text), text)):
            counts, medians = [], []
            for path in ("fused", "per-op"):
                values = times.get((shape, path), [])
                counts.append(str(len(values)))
                medians.append(f"{statistics.median(values) * 1e3:.1f}" if values else "-")
            print(f"| {shape} | {' / '.join(counts)} | {' / '.join(medians)} |")
        ttfts = list(first_token.values())
        label = "engine path" if args.engine_path else "paths alternating"
        print(f"{label}: {tokens / elapsed_run:.1f} out tok/s ({tokens} tokens in {elapsed_run:.1f} s), "
              f"TTFT p50 {percentile(ttfts, 50) * 1e3:.0f} / p99 {percentile(ttfts, 99) * 1e3:.0f} ms, "
              f"engine thread CPU / step wall {step_cpu / step_wall:.2f}")
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--model", default=None, help="default: the engine's (embedded SmolLM2-135M)")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-gib", type=float, default=2.0)
    parser.add_argument("--closed-loop", type=int, default=None, metavar="C",
                        help="instead: C users sending requests one after another; step shapes and their times")
    parser.add_argument("--requests-per-user", type=int, default=3)
    parser.add_argument("--output-len", type=int, default=128, help="closed loop: tokens per request")
    parser.add_argument("--engine-path", action="store_true",
                        help="closed loop: every step on the path the engine picks (no alternation)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048,
                        help="closed loop: the scheduler's chunk (serve_config.yaml ships 2048)")
    args = parser.parse_args()
    flags = [flag for flag in ("avx512_bf16", "amx_tile") if flag in open("/proc/cpuinfo").read()]
    print(f"flags: {' '.join(flags) or 'neither avx512_bf16 nor amx'}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; threads {args.threads or torch.get_num_threads()}; "
          f"{args.dtype}; load average before {os.getloadavg()[0]:.2f}")
    if args.closed_loop is not None:
        closed_loop(args.closed_loop, args)
        print(f"load average after {os.getloadavg()[0]:.2f}")
        return
    print("| batch | fused ms | per-op ms | per-op / fused | CPU ms per step fused / per-op |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        result = measure(batch, args)
        fused, per_op = result.get("fused"), result["per-op"]
        if fused is None:
            print(f"| {batch} | - | {per_op['wall']:.1f} | - | - / {per_op['cpu']:.1f} |")
            continue
        print(f"| {batch} | {fused['wall']:.1f} | {per_op['wall']:.1f} | {per_op['wall'] / fused['wall']:.2f}x | "
              f"{fused['cpu']:.1f} / {per_op['cpu']:.1f} |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
