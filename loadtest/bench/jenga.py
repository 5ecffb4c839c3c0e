"""Jenga's benchmarks, each side by side in one run and at one device budget.

- `memory`: how many requests' KV fit, and how much of the held KV memory is in use, with the LCM
  two-level allocator vs padding every kind to the largest page (vLLM's hybrid manager) vs a static
  partition per kind (shares proportional to the workload's mean demand: its best static split).
  Workloads: Gemma 3 270M with long prompts (full and sliding kinds), and SmolLM2-135M + Gemma 3 270M
  in one pool (three kinds). Page sizes are the models' real ones (bf16, 16 tokens per page), on the
  `sim` backend with 2 MiB chunks (CUDA's granule); requests are admitted in order until one does not fit.
- `evictor`: Gemma 3 270M's (or SmolLM2's) KV manager (the real KVCacheManager on the `host` backend, no
  model) under a shared-prefix workload with a KV budget that forces evictions: prefix-hit rate with `lru`
  vs `prefix_subset`.
- `evictor-engine`: the same question through the real Gemma 3 270M engine, both evictors side by side
  in one run: hit rate and output tokens/s (loadtest/bench/jenga_evictor.py).
- `pool`: the two-model mix through two real paged KV managers on one KVBalloon, with the pages an
  EngineGroup gives SmolLM2 and Gemma 3 in one pool (loadtest/bench/jenga_pool.py): LCM vs padding vs static.
- `paged`, `attention`: paged vs contiguous on CPU, whole SmolLM2 engines and one attention layer, fp32 and
  bf16 (loadtest/bench/jenga_paged.py).

    python -m loadtest.bench.jenga memory [--budget-gib 2]
    python -m loadtest.bench.jenga evictor [--requests 400] [--model smollm2] [--workload short --budget-mib 40]
    python -m loadtest.bench.jenga evictor-engine [--requests 48] [--kv-mib 80] [--concurrency 4] [--layout paged]
    python -m loadtest.bench.jenga pool [--budget-gib 2]
    python -m loadtest.bench.jenga paged [--rounds 3] [--dtype float32 bfloat16]
    python -m loadtest.bench.jenga attention [--iterations 300]
"""

from __future__ import annotations

import argparse
import random

import torch

from loadtest.bench.jenga_paged import DTYPES, bench_attention, bench_paged
from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec
from memory.kv.cache_policy import FullAttentionPolicy, SlidingWindowPolicy
from memory.lcm_allocator import LcmAllocator

CHUNK = 2 << 20
PAGE_TOKENS = 16
BF16 = 2
# kind -> (layers, KV heads x head_dim, cache policy); the real models' shapes
KINDS = {
    "smollm2/full": (30, 3 * 64, FullAttentionPolicy(PAGE_TOKENS)),
    "gemma3/full": (3, 1 * 256, FullAttentionPolicy(PAGE_TOKENS)),
    "gemma3/sliding": (15, 1 * 256, SlidingWindowPolicy(PAGE_TOKENS, 512)),
}
MODEL_KINDS = {"smollm2": ("smollm2/full",), "gemma3": ("gemma3/full", "gemma3/sliding")}


def page_bytes(kind: str) -> int:
    layers, width, _ = KINDS[kind]
    return PAGE_TOKENS * width * BF16 * 2 * layers  # K and V of every layer of the kind


def pages_for(kind: str, num_tokens: int) -> int:
    return len(KINDS[kind][2].resident_pages(num_tokens))


def workload(name: str, count: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    if name == "gemma3-long":
        return [("gemma3", rng.randint(2048, 8192)) for _ in range(count)]
    every = 4 if name == "mix-shifted" else 2  # shifted: 3 SmolLM2 requests per Gemma one
    return [(("smollm2", rng.randint(256, 2048)) if i % every else ("gemma3", rng.randint(2048, 8192)))
            for i in range(count)]


def admit_until_full(allocator: LcmAllocator, requests: list[tuple[str, int]]) -> int:
    admitted = 0
    for model, tokens in requests:
        taken = []
        for kind in MODEL_KINDS[model]:
            pages = allocator.allocate(kind, pages_for(kind, tokens))
            if pages is None:
                allocator.free([p for group in taken for p in group])
                return admitted
            taken.append(pages)
        admitted += 1
    return admitted


def bench_memory(budget_gib: float) -> None:
    print(f"{'workload':<14} {'allocator':<18} {'requests':>8} {'KV held MiB':>12} {'in use':>7}  large page")
    for name in ("gemma3-long", "two-model-mix", "mix-shifted"):
        requests = workload(name, 10_000)
        kinds = sorted({k for model, _ in requests for k in MODEL_KINDS[model]})
        sizes = {kind: page_bytes(kind) for kind in kinds}
        # the static split is planned on the 1:1 mix (mix-shifted: the traffic moved after planning)
        planned = workload("two-model-mix", 10_000) if name == "mix-shifted" else requests
        demand = {kind: sum(pages_for(kind, t) * sizes[kind] for m, t in planned if kind in MODEL_KINDS[m])
                  for kind in kinds}
        shares = {kind: demand[kind] / sum(demand.values()) for kind in kinds}
        variants = {
            "lcm": lambda pool, s=sizes: LcmAllocator(pool, "kv", s),
            "pad-to-largest": lambda pool, s=sizes: LcmAllocator.pad_to_largest(pool, "kv", s),
            "static-partition": lambda pool, s=sizes, sh=shares: LcmAllocator.static_partition(pool, "kv", s, sh),
        }
        for label, make in variants.items():
            pool = ElasticPool(create_backend("sim"), int(budget_gib * (1 << 30)) // CHUNK * CHUNK, CHUNK)
            allocator = make(pool)
            admitted = admit_until_full(allocator, requests)
            stats = allocator.all_telemetry().values()
            held = sum(t.bytes_held for t in stats)
            used = sum(t.bytes_used for t in stats)
            print(f"{name:<14} {label:<18} {admitted:>8} {held / 2**20:>12.1f} {used / held:>7.1%}  "
                  f"{allocator.chunks_per_large_page} chunk(s)")
            allocator.close()
            pool.close()


def bench_evictor(num_requests: int, model: str, workload: str = "long", budget_mib: float | None = None,
                  seed: int = 0) -> None:
    """Shared system prompts + private questions, on Gemma 3's layer groups (3 full + 15 sliding layers)
    or SmolLM2's (30 full layers), one request at a time. `long`: 8 prompts of 1-3 K tokens, Zipf-popular,
    + 20-200-token questions; `short`: the engine bench's workload (`evictor-engine`: 6 prompts of
    608-1,024 tokens + 20-100-token questions)."""
    from loadtest.bench.jenga_evictor import shared_prefix_workload
    from memory.kv import LayerGroup

    rng = random.Random(seed)
    if workload == "short":
        requests = shared_prefix_workload(num_requests, seed, PAGE_TOKENS)
    else:
        prefixes = [[rng.randrange(1, 250_000) for _ in range(rng.randint(64, 192) * PAGE_TOKENS)] for _ in range(8)]
        weights = [1 / (i + 1) for i in range(len(prefixes))]
        requests = [rng.choices(prefixes, weights)[0]
                    + [rng.randrange(1, 250_000) for _ in range(rng.randint(20, 200))] for _ in range(num_requests)]
    if model == "gemma3":
        groups = (LayerGroup(tuple(range(5, 18, 6)), None), LayerGroup(tuple(i for i in range(18) if i % 6 != 5), 512))
        shape = dict(num_layers=18, num_kv_heads=1, head_dim=256)
        budget_pages = 12_000  # about 2.5 whole cached prefixes (every sliding page kept), 6 windows-only
    else:  # SmolLM2's 30 full layers (2 KV heads here so a 16-token page stays a whole 4 KiB host page)
        groups = (LayerGroup(tuple(range(30)), None),)
        shape = dict(num_layers=30, num_kv_heads=2, head_dim=64)
        budget_pages = 30_000  # about 3 cached prefixes next to the running request
    spec = KVCacheSpec(**shape, dtype_bytes=BF16, groups=groups, max_slots=4, max_len=4096,
                       tokens_per_page=PAGE_TOKENS)
    if budget_mib is not None:
        budget_pages = int(budget_mib * 2**20) // spec.page_bytes
    print(f"{'evictor':<14} {'hit rate':>8} {'prompt tokens computed':>23}   ({budget_pages:,} pages of KV)")
    for evictor in ("lru", "prefix_subset"):
        # 4-8 KiB pages on the host backend: nothing is mapped until used
        kv_pool = ElasticPool(create_backend("host"), budget_pages * spec.page_bytes, spec.page_bytes)
        kv = KVCacheManager(spec, kv_pool, torch.bfloat16, evictor=evictor)
        computed = 0
        for index, prompt in enumerate(requests):
            request_id = f"r{index}"
            hit = kv.admit(request_id, prompt)
            computed += len(prompt) - hit
            for end in [*range(hit + 256, len(prompt), 256), len(prompt)]:
                if not kv.grow(request_id, end):
                    raise RuntimeError("budget too small for one request")
                kv.commit(request_id, prompt, end)
            kv.free(request_id)
        rate = kv.prefix.num_hit_tokens / kv.prefix.num_queried_tokens
        print(f"{evictor:<14} {rate:>8.1%} {computed:>23,}")
        kv.close()
        kv_pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    sub.add_parser("memory").add_argument("--budget-gib", type=float, default=2.0)
    evictor = sub.add_parser("evictor")
    evictor.add_argument("--requests", type=int, default=400)
    evictor.add_argument("--model", choices=("gemma3", "smollm2"), default="gemma3")
    evictor.add_argument("--workload", choices=("long", "short"), default="long")
    evictor.add_argument("--budget-mib", type=float, default=None, help="KV budget (default: per model)")
    engine = sub.add_parser("evictor-engine")
    engine.add_argument("--requests", type=int, default=48)
    engine.add_argument("--kv-mib", type=float, default=80.0)
    engine.add_argument("--concurrency", type=int, default=4)
    engine.add_argument("--max-tokens", type=int, default=16)
    engine.add_argument("--threads", type=int, default=1)
    engine.add_argument("--layout", choices=("contiguous", "paged"), default="contiguous")
    engine.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto")
    engine.add_argument("--seed", type=int, default=0, help="the workload's random seed")
    sub.add_parser("pool").add_argument("--budget-gib", type=float, default=2.0)
    paged = sub.add_parser("paged")
    paged.add_argument("--rounds", type=int, default=3)
    paged.add_argument("--dtype", nargs="+", choices=tuple(DTYPES), default=list(DTYPES))
    sub.add_parser("attention").add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    if args.bench == "memory":
        bench_memory(args.budget_gib)
    elif args.bench == "evictor":
        bench_evictor(args.requests, args.model, args.workload, args.budget_mib)
    elif args.bench == "evictor-engine":
        from loadtest.bench.jenga_evictor import bench_evictor_engine

        bench_evictor_engine(args.requests, args.kv_mib, args.concurrency, args.max_tokens, args.threads, args.layout,
                             args.dtype, args.seed)
    elif args.bench == "pool":
        from loadtest.bench.jenga_pool import bench_pool

        bench_pool(args.budget_gib)
    elif args.bench == "paged":
        bench_paged(args.rounds, args.dtype)
    else:
        bench_attention(args.iterations)


if __name__ == "__main__":
    main()
