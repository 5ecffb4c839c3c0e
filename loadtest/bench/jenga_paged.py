"""Jenga's paged-vs-contiguous benchmarks on CPU (run through `python -m loadtest.bench.jenga`).

- `attention`: one layer of SmolLM2's attention (9 query / 3 key-value heads of 64), 16 requests x 256
  tokens, 1 thread, fp32 and bf16: decode over the contiguous layout (native kernel reading each slot in
  place) vs the paged layout read in place through the block table (the same kernel) vs the paged layout's
  gather-then-attend path (the torch fallback); and one 128-token prefill chunk over 128 cached tokens in
  each layout (the paged one gathers the slot's pages, then the same SDPA). Paged pages are handed out to
  the requests in turn, page by page, as decoding requests grow. Interleaved calls, medians.
- `paged`: whole SmolLM2 engines on CPU, `contiguous` vs `paged` layout, 1 thread, 16 prompts of ~150
  tokens x 48 new tokens, interleaved rounds in one process; the prefill phase (until every request has its
  first token) and the decode phase are timed apart, in wall time and in process CPU time.
"""

from __future__ import annotations

import statistics
import time

import torch

from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PHASES = ("prefill wall", "decode wall", "prefill CPU", "decode CPU")


def _filled_managers(dtype: torch.dtype, batch_size: int, length: int, page_tokens: int):
    kv_heads, head_dim = 3, 64
    spec = KVCacheSpec(num_layers=1, num_kv_heads=kv_heads, head_dim=head_dim,
                       dtype_bytes=torch.empty((), dtype=dtype).element_size(), groups=(LayerGroup((0,), None),),
                       max_slots=batch_size, max_len=2 * length, tokens_per_page=page_tokens)
    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(batch_size, length, kv_heads, head_dim, generator=generator).to(dtype)
    values = torch.randn(batch_size, length, kv_heads, head_dim, generator=generator).to(dtype)
    managers = {}
    for layout in ("contiguous", "paged"):
        pool = ElasticPool(create_backend("host"), 4096 * spec.page_bytes, spec.page_bytes)
        kv = managers[layout] = KVCacheManager(spec, pool, dtype, layout=layout)
        for b in range(batch_size):
            kv.admit(f"r{b}", [b])
        for end in range(page_tokens, length + page_tokens, page_tokens):  # requests grow in turn
            for b in range(batch_size):
                kv.grow(f"r{b}", min(end, length))
        for b in range(batch_size):
            kv.write_kv(f"r{b}", 0, [(keys[b, : length - 1], values[b, : length - 1])])
    return managers, keys[:, -1], values[:, -1]


def _time_interleaved(calls: dict, iterations: int) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(iterations):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _call(backend, layer, q, k, v, caches, batch, out):
    return lambda: backend.forward(layer, q, k, v, *caches, batch, out)


def bench_attention(iterations: int, batch_size: int = 16, length: int = 256) -> None:
    from engine.device.rank import page_tokens_for

    torch.set_num_threads(1)
    print(f"one layer, {batch_size} requests x {length} tokens, 1 thread; medians")
    for dtype_name, dtype in DTYPES.items():
        # the engine's page size for a 16-token request: whole host pages (bf16: 32 tokens)
        page_tokens = page_tokens_for(16, [3 * 64 * dtype.itemsize], create_backend("host").granularity)
        _bench_attention_dtype(dtype_name, dtype, iterations, batch_size, length, page_tokens)


def _bench_attention_dtype(dtype_name: str, dtype: torch.dtype, iterations: int, batch_size: int, length: int,
                           page_tokens: int) -> None:
    from engine.attention import LayerAttentionSpec, create_attention_backend
    from engine.attention.paged_native import PagedNativeBackend
    from engine.attention.paged_torch import PagedTorchBackend
    from engine.core.forward_batch import ForwardBatch, PrefillChunk

    heads, kv_heads, head_dim, chunk = 9, 3, 64, length // 2
    layer = LayerAttentionSpec(num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, sliding_window=None)
    native = create_attention_backend("native")
    backends = {"contiguous": native, "paged": PagedNativeBackend(native), "paged-gather": PagedTorchBackend(native)}
    managers, k, v = _filled_managers(dtype, batch_size, length, page_tokens)
    caches = {name: managers["contiguous" if name == "contiguous" else "paged"].layer_caches()[0] for name in backends}
    slots = torch.tensor([managers["paged"].slot_of(f"r{b}") for b in range(batch_size)])
    assert torch.equal(slots, torch.tensor([managers["contiguous"].slot_of(f"r{b}") for b in range(batch_size)]))
    q = torch.randn(batch_size, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    decode = ForwardBatch(
        input_ids=torch.zeros(batch_size, dtype=torch.int64), positions=torch.full((batch_size,), length - 1),
        token_slots=slots, num_decode_tokens=batch_size, decode_slots=slots,
        decode_context_lens=torch.full((batch_size,), length),
        decode_slots_are_prefix=bool(torch.equal(slots, torch.arange(batch_size))),
        max_decode_context_len=length, prefills=(), logits_indices=torch.arange(batch_size))
    prefill_q = torch.randn(chunk, heads, head_dim, generator=torch.Generator().manual_seed(2)).to(dtype)
    prefill_kv = torch.randn(chunk, kv_heads, head_dim, generator=torch.Generator().manual_seed(3)).to(dtype)
    outputs = {name: torch.empty(batch_size, heads, head_dim, dtype=dtype) for name in backends}
    prefill_out = {name: torch.empty(chunk, heads, head_dim, dtype=dtype) for name in ("contiguous", "paged")}

    decode_times = _time_interleaved({name: _call(backend, layer, q, k, v, caches[name], decode, outputs[name])
                                      for name, backend in backends.items()}, iterations)
    base = decode_times["contiguous"]
    print(f"[{dtype_name}] {page_tokens}-token pages; decode: "
          + ", ".join(f"{name} {t * 1e6:.0f} us ({t / base:.3f}x)" for name, t in decode_times.items()))
    print(f"[{dtype_name}]   paged in place bit-identical to contiguous: "
          f"{torch.equal(outputs['paged'], outputs['contiguous'])}; gather path: "
          f"{torch.equal(outputs['paged-gather'], outputs['contiguous'])}")
    for start in (0, length - chunk):  # a prompt's first chunk (own K/V), a chunk over cached pages (gather)
        prefill = ForwardBatch(
            input_ids=torch.zeros(chunk, dtype=torch.int64), positions=torch.arange(start, start + chunk),
            token_slots=torch.full((chunk,), int(slots[0])), num_decode_tokens=0, decode_slots=slots[:0],
            decode_context_lens=slots[:0], decode_slots_are_prefix=True, max_decode_context_len=0,
            prefills=(PrefillChunk(int(slots[0]), start, chunk, 0),), logits_indices=torch.tensor([chunk - 1]))
        prefill_times = _time_interleaved({name: _call(backends[name], layer, prefill_q, prefill_kv, prefill_kv,
                                                       caches[name], prefill, prefill_out[name])
                                           for name in prefill_out}, max(iterations // 10, 20))
        contiguous_us, paged_us = prefill_times["contiguous"] * 1e6, prefill_times["paged"] * 1e6
        print(f"[{dtype_name}] prefill {chunk} tokens after {start}: contiguous {contiguous_us:.0f} us, paged "
              f"{paged_us:.0f} us ({paged_us / contiguous_us:.3f}x); "
              f"bit-identical: {torch.equal(prefill_out['paged'], prefill_out['contiguous'])}")
    for kv in managers.values():
        kv.close()


def _timed_run(engine, prompts, params, prefix: str) -> tuple[list[float], dict[str, list[int]]]:
    """([prefill wall, decode wall, prefill CPU, decode CPU] seconds, tokens per request): the prefill phase
    lasts until every request has its first token. CPU time is the process's (one torch thread): on a
    shared box it counts the work done, where wall time also counts the waits for a core."""
    from engine.api import GenerateRequest

    outputs: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerateRequest(f"{prefix}{index}", tuple(prompt), params))
        outputs[f"{prefix}{index}"] = []
    phases = [0.0, 0.0, 0.0, 0.0]
    while engine.has_work:
        phase = int(all(outputs.values()))
        wall, cpu = time.perf_counter(), time.process_time()
        for output in engine.step():
            outputs[output.request_id].extend(output.new_token_ids)
        phases[phase] += time.perf_counter() - wall
        phases[2 + phase] += time.process_time() - cpu
    return phases, {key[len(prefix):]: value for key, value in outputs.items()}


def bench_paged(rounds: int, dtypes: list[str]) -> None:
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.text.tokenizer import load_tokenizer
    from tests.engine.engine_helpers import PROMPTS, greedy

    tokenizer = load_tokenizer(None)
    texts = [" ".join(PROMPTS[i:] + PROMPTS[:i]) for i in range(len(PROMPTS))] * 2
    prompts = [tokenizer(text).input_ids for text in texts]
    print(f"SmolLM2, 1 thread, {len(prompts)} prompts of {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
          f"x 48 new tokens, {rounds} interleaved rounds")
    for dtype in dtypes:
        def config(layout: str, dtype=dtype) -> EngineConfig:
            return EngineConfig(dtype=dtype, num_threads=1, max_model_len=512, max_num_seqs=16,
                                max_num_batched_tokens=256, tokens_per_page=16, device_memory_bytes=1 << 30,
                                kv_layout=layout, enable_prefix_caching=False)

        engines = {layout: LLMEngine(config(layout), tokenizer=tokenizer) for layout in ("contiguous", "paged")}
        times: dict[str, list[list[float]]] = {layout: [] for layout in engines}
        outputs = {}
        for index in range(rounds):
            for layout, engine in engines.items():
                phases, outputs[layout] = _timed_run(engine, prompts, greedy(48), f"{layout}{index}-")
                times[layout].append(phases)
        for layout, values in times.items():
            print(f"[{dtype}] {layout:<11} " + "; ".join(
                f"{name} {' '.join(f'{phases[i]:.2f}' for phases in values)} s" for i, name in enumerate(PHASES)))
        for i, name in enumerate(PHASES):
            per_round = [p[i] / c[i] for p, c in zip(times["paged"], times["contiguous"], strict=True)]
            best = min(p[i] for p in times["paged"]) / min(c[i] for c in times["contiguous"])
            print(f"[{dtype}] paged / contiguous, {name}: best rounds {best:.3f}, per round "
                  f"{' '.join(f'{r:.3f}' for r in per_round)} (median {statistics.median(per_round):.3f})")
        print(f"[{dtype}] same tokens: {outputs['paged'] == outputs['contiguous']}")
        for engine in engines.values():
            engine.close()
