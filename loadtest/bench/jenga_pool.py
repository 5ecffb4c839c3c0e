"""`python -m loadtest.bench.jenga pool`: the two-model mix through the served path's own KV pieces.

Where `jenga memory` drives the allocator alone with 16-token pages for every model, this runs what an
EngineGroup builds for `models: [smollm2-135m, gemma3-270m]`: two real paged KVCacheManagers (the models'
bf16 shapes) attached to one KVBalloon of one ElasticPool, with the pages the group gives them (one pool
chunk = one layer's K page of either model: 128 SmolLM2 tokens or 96 Gemma tokens, 48 KiB; small pages of
60 chunks for SmolLM2, 30 for Gemma's 15 sliding layers, 6 for its 3 full layers). Requests (1:1, or 3:1
after a split planned for 1:1) are admitted in order, each prefilled in 512-token chunks (pages that slide
out of Gemma's 512-token window go back), until one does not fit. The allocator behind the balloon is the
LCM one, padding every kind to the largest page, or a static partition sized by the planned demand; the
pool is the `sim` backend (books only) at 4 KiB granularity with the same KV budget for each.
"""

from __future__ import annotations

import random

import torch

from engine.core.engine_group import shared_page_bytes
from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup
from memory.kv.balloon import KVBalloon
from memory.page_policies import StaticPartition

BF16 = 2
WINDOW = 512
PREFILL_CHUNK = 512
GEMMA_LAYERS = ((S := "sliding",) * 5 + ("full",)) * 3


def specs(max_len: int, max_slots: int) -> tuple[int, dict[str, KVCacheSpec]]:
    """The pool chunk and each model's KV spec as an EngineGroup sizes them (bf16, 128 requested tokens)."""
    chunk = shared_page_bytes(128, [3 * 64 * BF16, 1 * 256 * BF16], 4096)
    smol = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64, dtype_bytes=BF16,
                       groups=(LayerGroup(tuple(range(30)), None),), max_slots=max_slots,
                       max_len=-(-max_len // (chunk // 384)) * (chunk // 384), tokens_per_page=chunk // 384)
    groups = KVCacheSpec.group_layers([WINDOW if kind == S else None for kind in GEMMA_LAYERS])
    gemma = KVCacheSpec(num_layers=18, num_kv_heads=1, head_dim=256, dtype_bytes=BF16, groups=groups,
                        max_slots=max_slots, max_len=-(-max_len // (chunk // 512)) * (chunk // 512),
                        tokens_per_page=chunk // 512)
    return chunk, {"smollm2": smol, "gemma3": gemma}


def workload(shifted: bool, count: int, seed: int = 0) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    every = 4 if shifted else 2
    return [(("smollm2", rng.randint(256, 2048)) if i % every else ("gemma3", rng.randint(2048, 8192)))
            for i in range(count)]


def kind_sizes(chunk: int, models: dict[str, KVCacheSpec]) -> dict[str, int]:
    return {f"{model}/g{index}": 2 * len(group.layers) * chunk
            for model, spec in models.items() for index, group in enumerate(spec.groups)}


def kind_demand(chunk: int, models: dict[str, KVCacheSpec], requests: list[tuple[str, int]]) -> dict[str, int]:
    """Bytes of KV each kind needs for the requests at their full length (sliding kinds: the window)."""
    demand = dict.fromkeys(kind_sizes(chunk, models), 0)
    for model, tokens in requests:
        spec = models[model]
        for index, group in enumerate(spec.groups):
            span = min(tokens, group.sliding_window + spec.tokens_per_page) if group.sliding_window else tokens
            demand[f"{model}/g{index}"] += spec.num_pages(span) * 2 * len(group.layers) * chunk
    return demand


def admit_until_full(managers: dict[str, KVCacheManager], requests: list[tuple[str, int]]) -> dict[str, int]:
    admitted = dict.fromkeys(managers, 0)
    rng = random.Random(1)
    for index, (model, tokens) in enumerate(requests):
        kv, request_id = managers[model], f"r{index}"
        prompt = [rng.randrange(1, 40_000) for _ in range(tokens)]
        kv.admit(request_id, prompt)
        for end in [*range(PREFILL_CHUNK, tokens, PREFILL_CHUNK), tokens]:
            if not kv.grow(request_id, end):
                kv.free(request_id)
                return admitted
            kv.commit(request_id, prompt, end)
        admitted[model] += 1
    return admitted


def bench_pool(budget_gib: float) -> None:
    chunk, models = specs(8192 + PREFILL_CHUNK, 512)
    sizes = kind_sizes(chunk, models)
    planned = workload(False, 10_000)
    demand = kind_demand(chunk, models, planned)
    shares = {kind: need / sum(demand.values()) for kind, need in demand.items()}
    variants = {"lcm": "lcm", "pad-to-largest": "pad_to_largest", "static-partition": StaticPartition(shares)}
    print(f"one pool chunk: {chunk} B; page tokens: "
          + ", ".join(f"{name} {spec.tokens_per_page}" for name, spec in models.items())
          + "; small pages (chunks): " + ", ".join(f"{kind} {size // chunk}" for kind, size in sizes.items()))
    print(f"{'workload':<14} {'allocator':<18} {'requests':>8} {'smollm2':>8} {'gemma3':>7} "
          f"{'KV held MiB':>12} {'in use':>7}  large page")
    for name, shifted in (("two-model-mix", False), ("mix-shifted", True)):
        requests = workload(shifted, 10_000)
        for label, make in variants.items():
            pool = ElasticPool(create_backend("sim", granularity=4096), int(budget_gib * (1 << 30)) // chunk * chunk,
                               chunk)
            balloon = KVBalloon(pool, page_policy=make)
            managers = {model: KVCacheManager(spec, pool, torch.bfloat16, layout="paged", balloon=balloon,
                                              owner=model, enable_prefix_caching=False)
                        for model, spec in models.items()}
            admitted = admit_until_full(managers, requests)
            stats = balloon.telemetry().values()
            held = sum(t.bytes_held for t in stats)
            used = sum(t.bytes_used for t in stats)
            print(f"{name:<14} {label:<18} {sum(admitted.values()):>8} {admitted['smollm2']:>8} "
                  f"{admitted['gemma3']:>7} {held / 2**20:>12.1f} {used / max(held, 1):>7.1%}  "
                  f"{balloon.allocator.chunks_per_large_page} chunks")
            for kv in managers.values():
                for request_id in list(kv.requests):
                    kv.free(request_id)
                kv.close()
            pool.close()
