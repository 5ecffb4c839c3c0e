"""Jenga's evictor through the real Gemma 3 270M engine (run through `python -m loadtest.bench.jenga
evictor-engine`): `lru` vs `prefix_subset`, prefix-hit rate and output tokens/s, side by side in one run.

Workload: shared system prompts (6 of 608-1,024 tokens, longer than Gemma's 512-token window, Zipf-popular)
+ a private 20-100-token question each, `--max-tokens` greedy new tokens, in a fixed order; each engine keeps
`--concurrency` requests in flight (closed loop: a request is added when one ends). Both engines are built
from one load of the weights, each with a `static` pool whose KV share is `--kv-mib` (the weights and the
activation reserve apart), so the cached prefixes outgrow it and the evictor decides what survives. The two
engines take turns step by step in one process (one torch thread each by default), so both see the same
load on a shared machine; each one's time is the sum of its own steps (wall and process CPU).
"""

from __future__ import annotations

import dataclasses
import random
import time

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams

EVICTORS = ("lru", "prefix_subset")


def shared_prefix_workload(num_requests: int, seed: int = 0, page_tokens: int = 16) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1000, 200_000) for _ in range(rng.randint(38, 64) * page_tokens)] for _ in range(6)]
    weights = [1 / (i + 1) for i in range(len(prefixes))]
    return [rng.choices(prefixes, weights)[0] + [rng.randrange(1000, 200_000) for _ in range(rng.randint(20, 100))]
            for _ in range(num_requests)]


@dataclasses.dataclass
class EngineRun:
    engine: object
    queue: list[tuple[str, list[int]]]
    tokens: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    in_flight: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    steps: int = 0

    def refill(self, concurrency: int, params: SamplingParams) -> None:
        while self.queue and self.in_flight < concurrency:
            request_id, prompt = self.queue.pop(0)
            self.engine.add_request(GenerateRequest(request_id, tuple(prompt), params))
            self.tokens[request_id] = []
            self.in_flight += 1

    def step(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        outputs = self.engine.step()
        self.wall_s += time.perf_counter() - wall
        self.cpu_s += time.process_time() - cpu
        self.steps += 1
        for output in outputs:
            self.tokens[output.request_id].extend(output.new_token_ids)
            if output.is_finished:
                self.in_flight -= 1


def _config(threads: int, layout: str, max_len: int, dtype: str) -> EngineConfig:
    return EngineConfig(model="gemma3-270m", dtype=dtype, pool_policy="static", tokens_per_page=16,
                        max_model_len=max_len, max_num_seqs=8, max_num_batched_tokens=256, num_threads=threads,
                        kv_layout=layout, device_memory_bytes=8 << 30)


def build_engines(kv_mib: float, threads: int, layout: str, dtype: str = "auto",
                  max_len: int = 1280) -> dict[str, object]:
    """One engine per evictor from one load of the weights, each with a static KV share of `kv_mib`."""
    from engine.core.engine import LLMEngine
    from engine.device.rank import build_rank
    from engine.text.tokenizer import load_tokenizer
    from engine.weights import load_weights, resolve_model_source

    base = _config(threads, layout, max_len, dtype)
    source = resolve_model_source(base.model)
    loaded_config, weights = load_weights(source, base.torch_dtype, show_progress=False)
    probe = build_rank(base, loaded=(loaded_config, dict(weights)))  # what the weights and activations take
    chunk = probe.pool.chunk_bytes
    not_kv = probe.pool.num_chunks - probe.pool.policy.shares["kv"]
    probe.close()
    kv_chunks = int(kv_mib * 2**20) // chunk
    tokenizer = load_tokenizer(source)
    engines = {}
    for evictor in EVICTORS:
        config = dataclasses.replace(base, kv_evictor=evictor, device_memory_bytes=(not_kv + kv_chunks) * chunk)
        rank = build_rank(config, loaded=(loaded_config, dict(weights)))
        assert rank.pool.policy.shares["kv"] == kv_chunks
        engines[evictor] = LLMEngine(config, tokenizer=tokenizer, rank=rank)
    return engines


def bench_evictor_engine(num_requests: int, kv_mib: float, concurrency: int, max_tokens: int, threads: int,
                         layout: str, dtype: str = "auto", seed: int = 0) -> None:
    prompts = shared_prefix_workload(num_requests, seed)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    engines = build_engines(kv_mib, threads, layout, dtype)
    first = next(iter(engines.values()))
    print(f"Gemma 3 270M ({first.dtype}, {layout} layout, {first.kv_spec.tokens_per_page}-token pages), "
          f"{num_requests} requests, {sum(map(len, prompts)):,} prompt tokens, {max_tokens} new tokens each, "
          f"{concurrency} in flight per engine, KV share {kv_mib:g} MiB, {threads} torch thread(s)")
    runs = {name: EngineRun(engine, [(f"r{i}", p) for i, p in enumerate(prompts)]) for name, engine in engines.items()}
    try:
        while any(run.queue or run.in_flight for run in runs.values()):
            for run in runs.values():  # the engines take turns, one step each
                run.refill(concurrency, params)
                if run.in_flight:
                    run.step()
        print(f"{'evictor':<14} {'hit rate':>8} {'prompt tokens computed':>23} {'preempted':>9} {'steps':>6} "
              f"{'wall s':>7} {'output tok/s':>12} {'CPU s':>7} {'output tok/CPU s':>16}")
        for name, run in runs.items():
            kv, scheduler = run.engine.kv, run.engine.scheduler
            output_tokens = sum(map(len, run.tokens.values()))
            assert output_tokens == num_requests * max_tokens
            computed = kv.prefix.num_queried_tokens - kv.prefix.num_hit_tokens
            print(f"{name:<14} {kv.prefix.num_hit_tokens / kv.prefix.num_queried_tokens:>8.1%} {computed:>23,} "
                  f"{scheduler.num_preemptions:>9} {run.steps:>6} {run.wall_s:>7.1f} "
                  f"{output_tokens / run.wall_s:>12.2f} {run.cpu_s:>7.1f} {output_tokens / run.cpu_s:>16.2f}")
        lru, subset = (runs[name] for name in EVICTORS)
        same = sum(lru.tokens[r] == subset.tokens[r] for r in lru.tokens)
        print(f"prefix_subset / lru: output tok/s x{lru.wall_s / subset.wall_s:.2f} (wall), "
              f"x{lru.cpu_s / subset.cpu_s:.2f} (CPU); same greedy tokens in {same} of {num_requests} requests")
    finally:
        for engine in engines.values():
            engine.close()
