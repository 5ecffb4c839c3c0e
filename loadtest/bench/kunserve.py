"""`python -m loadtest.bench.kunserve`: KunServe's mechanisms at the engine level, measured side by side.

Two engines of the embedded SmolLM2 in one process (`--dtype`, one torch thread each, so the two pipeline
stages can run at once on two cores):

1. drop / restore: the time to drop half the layers (unmap + deflate), the chunks and KV tokens it frees,
   and the time to restore them by copy from the host copy, next to the time to load the model's weights
   again (what restoring would cost without the host copy);
2. cooperative execution: a prefill-only workload (`--prefills` long prompts, full 256-token steps) and a
   decode workload (`--batch` greedy requests) on one engine alone, then on the pipeline of the pair with
   up to 1, 2 and 4 micro-batches (a micro-batch has at least 64 tokens, so decode steps run whole): ms
   per step and the pipeline's bubble ratio. Every run produces the same tokens (checked).
"""

from __future__ import annotations

import argparse
import time

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.cooperative.carry import CarryPolicy
from engine.cooperative.pair import CooperativePair
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.weights import load_weights, resolve_model_source


def make_engine(dtype: str, threads: int) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=dtype, num_threads=threads, max_model_len=512, max_num_seqs=32,
                                  max_num_batched_tokens=256, device_memory_bytes=1 << 30,
                                  host_buffer_bytes=16 << 20, enable_parameter_dropping=True))


def bench_drop_restore(engine: LLMEngine, dtype: str) -> None:
    layers = engine.model_config.num_layers
    dropped = range(layers // 2, layers)
    spec = engine.kv_spec
    chunks_per_page = 2 * spec.num_layers  # one page of K and V in every layer

    def kv_tokens() -> int:  # tokens of KV (every layer) the pool could hold
        return engine.kv_capacity_chunks() // chunks_per_page * spec.tokens_per_page

    tokens_before = kv_tokens()
    started = time.perf_counter()
    freed = engine.drop_layers(dropped)
    drop_ms = (time.perf_counter() - started) * 1e3
    tokens_after = kv_tokens()
    started = time.perf_counter()
    engine.restore_layers(dropped)
    restore_ms = (time.perf_counter() - started) * 1e3
    started = time.perf_counter()
    load_weights(resolve_model_source(None), engine.dtype, show_progress=False)
    reload_ms = (time.perf_counter() - started) * 1e3
    print(f"drop {len(dropped)}/{layers} layers: {freed} chunks ({freed * engine.pool.chunk_bytes / 2**20:.1f} MiB) "
          f"in {drop_ms:.2f} ms; KV capacity {tokens_before} -> {tokens_after} tokens "
          f"(x{tokens_after / tokens_before:.2f})")
    print(f"restore by copy: {restore_ms:.1f} ms; loading the weights again ({dtype}): {reload_ms:.0f} ms "
          f"({reload_ms / restore_ms:.0f}x the restore)")


def timed_run(run_step, add, prompts: list[list[int]], max_tokens: int, skip_steps: int) -> tuple[dict, float, int]:
    """Adds every prompt, steps until all finish; ms per step after the first `skip_steps` steps."""
    tokens: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        add(GenerateRequest(f"r{index}", tuple(prompt), SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                       ignore_eos=True)))
    for _ in range(skip_steps):
        run_step(tokens)
    started = time.perf_counter()
    steps = 0
    while sum(len(t) for t in tokens.values()) < max_tokens * len(prompts):
        run_step(tokens)
        steps += 1
    return tokens, (time.perf_counter() - started) * 1e3 / max(1, steps), steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=16, help="decoding requests")
    parser.add_argument("--tokens", type=int, default=16, help="tokens each decoding request generates")
    parser.add_argument("--prefills", type=int, default=4, help="prompts of the prefill-only workload")
    args = parser.parse_args()
    first, second = make_engine(args.dtype, 1), make_engine(args.dtype, 1)
    print(f"model {first.model_name} {first.dtype}, {first.model_config.num_layers} layers, "
          f"chunk {first.pool.chunk_bytes} B, weights {first.pool.num_held('weights')} chunks")
    bench_drop_restore(first, args.dtype)
    text = "Once upon a time, in a small village by the sea, there lived an old fisherman who "
    short = first.tokenizer(text).input_ids
    long = [first.tokenizer(f"{index}: " + text * 12).input_ids for index in range(args.prefills)]
    half = first.model_config.num_layers // 2
    results = {}
    for micro in (0, 1, 2, 4):  # 0: one engine alone
        pair = CooperativePair(first, second, num_micro_batches=max(1, micro), carry=CarryPolicy("recompute"))
        if micro:
            pair.drop(half, half)

        def step(tokens, pair=pair):
            for item in pair.step():
                tokens.setdefault(item.output.request_id, []).extend(item.output.new_token_ids)

        def add(request, pair=pair):
            pair.add_request(request, first)

        prefill = timed_run(step, add, long, 1, 0)
        decode = timed_run(step, add, [short] * args.batch, args.tokens, 2)
        bubble = pair._runner.stats.bubble_ratio if micro else 0.0
        if micro:
            pair.restore()
        results[micro] = (prefill, decode, bubble)
    (alone_prefill, alone_decode, _) = results.pop(0)
    print(f"one engine alone: prefill {alone_prefill[1]:.0f} ms/step ({alone_prefill[2]} steps of "
          f"{sum(map(len, long)) / alone_prefill[2]:.0f} tokens), decode {alone_decode[1]:.0f} ms/step (batch "
          f"{args.batch})")
    for micro, (prefill, decode, bubble) in results.items():
        same = prefill[0] == alone_prefill[0] and decode[0] == alone_decode[0]
        print(f"pipeline, up to {micro} micro-batch(es): prefill {prefill[1]:.0f} ms/step "
              f"({alone_prefill[1] / prefill[1]:.2f}x alone's speed), decode {decode[1]:.0f} ms/step "
              f"({alone_decode[1] / decode[1]:.2f}x), bubble ratio {bubble:.2f}, "
              f"{'same tokens' if same else 'TOKENS DIFFER'}")
    first.close()
    second.close()


if __name__ == "__main__":
    main()
