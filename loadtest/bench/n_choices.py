"""`python -m loadtest.bench.n_choices`: the n choices of one prompt forked from one prefill (one prompt group, as
the HTTP layer submits an OpenAI request with `n` > 1) against n separate requests, side by side in one process.

Each round submits n seeded top-p requests of one prompt at once, first as one group then as separate requests
(a different prompt each time, and the prefix cache emptied after each run, so no run hits another's pages), and
reports the prefill tokens computed, the time until the last choice has its first token, the wall time and the
peak KV held. Separate requests arriving together are admitted in the same steps: the prefix cache shares only
pages already computed, so most of them compute the prompt again.
"""

from __future__ import annotations

import argparse
import os
import time

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from loadtest.offline.engine_runner import make_prompts

MIB = 1 << 20


def run_once(engine: LLMEngine, prompt, n: int, output_len: int, tag: str, group: str | None) -> dict:
    prefill = 0

    def count(plan) -> None:
        nonlocal prefill
        prefill += sum(len(chunk.token_ids) for chunk in plan.prefills)

    engine.scheduler.plan_observers.append(count)
    first: dict[str, float] = {}
    peak_chunks = 0
    started = time.perf_counter()
    try:
        for index in range(n):
            params = SamplingParams(temperature=1.0, top_p=0.9, seed=index, max_tokens=output_len, ignore_eos=True)
            engine.add_request(GenerateRequest(f"{tag}-{index}", tuple(prompt), params, prompt_group=group))
        while engine.has_work:
            for output in engine.step():
                first.setdefault(output.request_id, time.perf_counter() - started)
            peak_chunks = max(peak_chunks, engine.kv.num_used_chunks())
        wall_s = time.perf_counter() - started
    finally:
        engine.scheduler.plan_observers.remove(count)
    while engine.kv.prefix.evictable:  # the next run must not hit these pages
        engine.kv._deflate_block(engine.kv.prefix.evict_oldest())
    return {"prefill_tokens": prefill, "last_first_token_ms": max(first.values()) * 1e3, "wall_s": wall_s,
            "peak_kv_mib": peak_chunks * engine.pool.chunk_bytes / MIB, "load": os.getloadavg()[0]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4, help="choices per prompt")
    parser.add_argument("--prompt-len", type=int, default=400)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = parser.parse_args(argv)
    config = EngineConfig(dtype=args.dtype, num_threads=args.threads, max_num_seqs=max(8, args.n),
                          max_model_len=args.prompt_len + args.output_len + 16,
                          max_num_batched_tokens=args.max_num_batched_tokens, device_memory_bytes=1 << 30)
    engine = LLMEngine(config)
    try:
        prompts = make_prompts(engine.tokenizer, 2 * args.rounds + 1, args.prompt_len, 7)
        run_once(engine, prompts[-1], args.n, 2, "warm", "warm")  # lazy kernel builds, untimed
        print(f"n={args.n}, prompt {args.prompt_len} tokens, {args.output_len} out, {engine.dtype}, "
              f"{args.threads} threads, page {config.tokens_per_page} tokens, budget {args.max_num_batched_tokens}")
        for round_index in range(args.rounds):
            for offset, (mode, group) in enumerate((("forked", f"g{round_index}"), ("separate", None))):
                result = run_once(engine, prompts[2 * round_index + offset], args.n, args.output_len,
                                  f"{mode}{round_index}", group)
                print(f"round {round_index} {mode:8s} prefill tokens {result['prefill_tokens']:5d}  last first token "
                      f"{result['last_first_token_ms']:7.0f} ms  wall {result['wall_s']:6.2f} s  peak KV "
                      f"{result['peak_kv_mib']:6.1f} MiB  load {result['load']:.1f}", flush=True)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
