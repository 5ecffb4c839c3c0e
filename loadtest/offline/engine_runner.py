"""Our engine in the offline benchmark: the prompts, the engine, and one timed run of all prompts at once.

`run_engine` steps the engine to the end and times each step; it watches each step's plan through the
scheduler's `plan_observers` hook (engine/core/scheduler.py) to tell prefill steps from pure decode steps and
to read KV use at its peak.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.scheduler import SchedulerOutput
from engine.sampling_params import SamplingParams
from loadtest.text import TextMaker

GIB = 1 << 30
MIB = 1 << 20


class _EngineTokenCounter:
    """loadtest.text's counter protocol over the engine's own tokenizer (so lengths are exact for it)."""

    is_exact = True
    name = "engine"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))


def make_prompts(tokenizer, num_prompts: int, prompt_len: int, seed: int) -> list[list[int]]:
    """`num_prompts` token-id lists of exactly `prompt_len` tokens of real words, different from the start."""
    maker = TextMaker(_EngineTokenCounter(tokenizer), random.Random(seed))
    prompts = []
    for _ in range(num_prompts):
        ids = tokenizer.encode(maker.text(prompt_len + 8), add_special_tokens=False)
        while len(ids) < prompt_len:  # the text maker gave up repairing: pad with more words
            ids += tokenizer.encode(" " + maker.text(prompt_len - len(ids), is_continuation=True),
                                    add_special_tokens=False)
        prompts.append(ids[:prompt_len])
    return prompts


def greedy(output_len: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


# ---- our engine --------------------------------------------------------------------------------
def run_engine(engine: LLMEngine, prompts: Sequence[Sequence[int]], output_len: int, tag: str,
               params: SamplingParams | None = None) -> dict:
    """Submits every prompt at once (greedy, or with `params`), steps to the end, and times each step.

    Each step's plan is observed (`scheduler.plan_observers`, for this run only) to tell prefill steps from
    pure decode steps and to read KV use at its peak: right after scheduling, before finished requests give
    their pages back."""
    plans: list[SchedulerOutput] = []
    peaks = {"kv_chunks": 0, "running": 0, "decoding": 0, "activation_chunks": 0, "planned_activation_chunks": 0,
             "step_chunks": 0}
    scheduler = engine.scheduler

    def observe(plan: SchedulerOutput) -> None:
        plans.append(plan)
        peaks["kv_chunks"] = max(peaks["kv_chunks"], engine.kv.num_used_chunks())
        peaks["running"] = max(peaks["running"], len(scheduler.running))
        # a request that has computed its first decode step holds its whole prompt's KV and one more token:
        # these are the requests truly resident at once
        decoding = sum(1 for request in scheduler.running
                       if request.num_computed_tokens > len(request.prompt_token_ids))
        peaks["decoding"] = max(peaks["decoding"], decoding)
        peaks["planned_activation_chunks"] = max(peaks["planned_activation_chunks"], plan.num_activation_chunks)
        step_chunks = engine.runner.activation_chunks(plan.num_tokens, plan.sampled_rows)  # model + sampler
        peaks["step_chunks"] = max(peaks["step_chunks"], step_chunks)

    preemptions_before = scheduler.num_preemptions
    for index, prompt in enumerate(prompts):
        engine.add_request(GenerateRequest(f"{tag}-{index}", tuple(prompt), params or greedy(output_len)))
    first_token_s: dict[str, float] = {}
    token_ids: dict[str, list[int]] = {f"{tag}-{index}": [] for index in range(len(prompts))}
    prefill = {"s": 0.0, "tokens": 0, "steps": 0}
    decode = {"s": 0.0, "steps": 0, "tokens": 0}
    num_idle = 0
    scheduler.plan_observers.append(observe)
    try:
        started = time.perf_counter()
        while engine.has_work:
            step_started = time.perf_counter()
            outputs = engine.step()
            elapsed = time.perf_counter() - step_started
            plan = plans.pop() if plans else None
            plans.clear()
            if plan is None or plan.is_empty:
                num_idle += 1
                if num_idle > 10_000:
                    raise RuntimeError("the engine has work but schedules nothing")
                continue
            peaks["activation_chunks"] = max(peaks["activation_chunks"], engine.pool.num_held("activations"))
            num_prefill = sum(len(chunk.token_ids) for chunk in plan.prefills)
            bucket = prefill if num_prefill else decode
            bucket["s"] += elapsed
            bucket["steps"] += 1
            prefill["tokens"] += num_prefill
            decode["tokens"] += 0 if num_prefill else len(plan.decodes)
            now = time.perf_counter() - started
            for output in outputs:
                first_token_s.setdefault(output.request_id, now)
                token_ids[output.request_id].extend(output.new_token_ids)
        wall_s = time.perf_counter() - started
    finally:
        scheduler.plan_observers.remove(observe)
    chunk_bytes = engine.pool.chunk_bytes
    num_steps = prefill["steps"] + decode["steps"]
    ttfts = sorted(first_token_s.values())
    return {
        "wall_s": wall_s,
        "output_tok_s": len(prompts) * output_len / wall_s,
        "prefill_tok_s": prefill["tokens"] / prefill["s"] if prefill["s"] else None,
        "mean_step_ms": (prefill["s"] + decode["s"]) / num_steps * 1e3 if num_steps else None,
        "mean_decode_step_ms": decode["s"] / decode["steps"] * 1e3 if decode["steps"] else None,
        "decode_tok_s": decode["tokens"] / decode["s"] if decode["s"] else None,  # tokens of pure decode steps
        "ttft_ms": ttfts[0] * 1e3 if ttfts else None,
        "last_ttft_ms": ttfts[-1] * 1e3 if ttfts else None,
        "num_steps": num_steps,
        "num_prefill_steps": prefill["steps"],
        "num_prefill_tokens": prefill["tokens"],
        "num_preemptions": scheduler.num_preemptions - preemptions_before,
        "peak_running": peaks["running"],
        "peak_decoding": peaks["decoding"],
        "peak_kv_bytes": peaks["kv_chunks"] * chunk_bytes,
        "peak_kv_budget_pct": 100.0 * peaks["kv_chunks"] * chunk_bytes / engine.config.device_memory_bytes,
        "peak_activation_bytes": peaks["activation_chunks"] * chunk_bytes,
        "peak_planned_activation_bytes": peaks["planned_activation_chunks"] * chunk_bytes,
        "peak_step_workspace_bytes": peaks["step_chunks"] * chunk_bytes,
        "token_ids": list(token_ids.values()),
    }


def build_engine(args, tokenizer=None, **overrides) -> LLMEngine:
    # no prefix caching: rounds repeat the same prompts, and the peer runs without it too
    options = dict(model=getattr(args, "model", None), dtype=args.dtype, num_threads=args.threads,
                   device_memory_bytes=int(args.memory_gib * GIB),
                   enable_prefix_caching=False,
                   max_num_batched_tokens=args.max_num_batched_tokens,
                   max_prefill_chunk_tokens=args.max_prefill_chunk_tokens,
                   max_num_seqs=args.max_num_seqs or min(max(64, args.num_prompts), 256))
    options.update(overrides)
    return LLMEngine(EngineConfig(**options), tokenizer=tokenizer)
