"""Mixed mode of the offline benchmark (eLLM): long prompts arriving among many decoding short requests.

Every configuration runs the same workload at the same device budget, one after the other in one process:
`--mixed-short` requests of `--prompt-len` tokens (`--output-len` out) are submitted at once; then one long
prompt of `--capacity-prompt-len` tokens (`--mixed-long-output-len` out) arrives every `--mixed-gap` steps,
`--mixed-long` of them. Arrivals are counted in engine steps, not seconds, so every configuration sees the same
schedule of arrivals whatever the box's load.

Configurations (the elastic/static pair at each prefill-chunk setting):
- elastic fixed: one pool, every step's budget is max_num_batched_tokens (today's default)
- elastic adaptive: one pool, the budget swells up to --max-prefill-chunk-tokens when KV leaves room
- elastic adaptive slo: the same with the `slo` memory arbiter (engine/core/memory_arbiter.py): decodes are
  swapped out so a long prompt about to miss `--ttft-slo-ms` gets a larger chunk (not run unless named)
- static fixed: activations reserved at start for max_num_batched_tokens + max_num_seqs tokens
- static ceiling: activations reserved at start for the ceiling (eLLM's static baseline for large chunks)

Each configuration's pool is read after every step (`timeline`: the balloons, free chunks, running requests,
prefill tokens); `plot_timelines` draws them with the load test's memory plot (loadtest/report.py), one panel
per configuration, steps on the x axis.
"""

from __future__ import annotations

import time
from pathlib import Path

from engine.api import GenerateRequest
from loadtest.offline.engine_runner import GIB, MIB, build_engine, greedy, make_prompts
from loadtest.offline.tables import format_table, load_average
from loadtest.telemetry import MemoryPoint

CONFIGS = {
    "elastic fixed": dict(pool_policy="elastic", ceiling=False),
    "elastic adaptive": dict(pool_policy="elastic", ceiling=True),
    "elastic adaptive slo": dict(pool_policy="elastic", ceiling=True, arbiter="slo"),
    "static fixed": dict(pool_policy="static", ceiling=False),
    "static ceiling": dict(pool_policy="static", ceiling=True),
}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_one(engine, short_prompts, long_prompts, args) -> dict:
    arrival: dict[str, float] = {}
    first: dict[str, float] = {}
    last_token: dict[str, float] = {}
    gaps: list[float] = []  # short requests' time between tokens (TPOT samples)
    decode_tokens = 0
    running_sizes: list[int] = []
    started = time.perf_counter()

    def add(request_id: str, prompt, output_len: int) -> None:
        engine.add_request(GenerateRequest(request_id, tuple(prompt), greedy(output_len)))
        arrival[request_id] = time.perf_counter()

    for index, prompt in enumerate(short_prompts):
        add(f"s{index}", prompt, args.output_len)
    preempted_before = engine.scheduler.num_preemptions
    num_steps = 0
    next_long = 0
    while engine.has_work or next_long < len(long_prompts):
        if next_long < len(long_prompts) and num_steps >= (next_long + 1) * args.mixed_gap:
            add(f"L{next_long}", long_prompts[next_long], args.mixed_long_output_len)
            next_long += 1
        outputs = engine.step()
        num_steps += 1
        running_sizes.append(len(engine.scheduler.running))
        now = time.perf_counter()
        for output in outputs:
            request_id = output.request_id
            if request_id not in first:
                first[request_id] = now
            elif request_id.startswith("s"):
                gaps.append(now - last_token[request_id])
                decode_tokens += 1
            last_token[request_id] = now
    wall = time.perf_counter() - started
    long_ttft = [(first[rid] - arrival[rid]) * 1e3 for rid in first if rid.startswith("L")]
    short_ttft = [(first[rid] - arrival[rid]) * 1e3 for rid in first if rid.startswith("s")]
    short_decode_s = max(last_token[rid] for rid in last_token if rid.startswith("s")) - started
    chosen = dict(sorted(engine.scheduler.chunk_policy.chosen.items()))
    return {
        "wall_s": wall,
        "long_ttft_p50_ms": _percentile(long_ttft, 0.5),
        "long_ttft_p99_ms": _percentile(long_ttft, 0.99),
        "short_ttft_p50_ms": _percentile(short_ttft, 0.5),
        "short_tpot_p50_ms": _percentile([g * 1e3 for g in gaps], 0.5),
        "short_tpot_p99_ms": _percentile([g * 1e3 for g in gaps], 0.99),
        "decode_tok_s": decode_tokens / short_decode_s if short_decode_s > 0 else None,
        "num_preemptions": engine.scheduler.num_preemptions - preempted_before,
        "num_steps": num_steps,
        "mean_running": sum(running_sizes) / len(running_sizes),
        "max_running": max(running_sizes),
        "activation_reserved_bytes": engine.pool.policy.shares.get("activations", 0) * engine.pool.chunk_bytes
        if engine.config.pool_policy == "static" else 0,
        "chunk_budgets": chosen,
        "arbiter_actions": dict(engine.scheduler.arbiter.actions),
        "arbiter_swaps": engine.scheduler.arbiter.num_victims,
        "load": load_average(),
    }


def run_mixed(args, tokenizer=None) -> dict:
    budget = int(args.budget_gib * GIB)
    ceiling = args.max_prefill_chunk_tokens or 8192
    result: dict = {"budget_bytes": budget, "ceiling": ceiling, "configs": {}}
    names = args.mixed_configs.split(",") if getattr(args, "mixed_configs", None) else \
        [name for name in CONFIGS if "slo" not in name]
    for name in names:
        setting = CONFIGS[name]
        engine = build_engine(args, tokenizer=tokenizer, pool_policy=setting["pool_policy"],
                              device_memory_bytes=budget, max_num_seqs=args.max_num_seqs or 64, max_model_len=None,
                              max_prefill_chunk_tokens=ceiling if setting["ceiling"] else None,
                              memory_arbiter=setting.get("arbiter", "kv_first"),
                              ttft_slo_ms=getattr(args, "ttft_slo_ms", None))
        tokenizer = engine.tokenizer
        short = make_prompts(tokenizer, args.mixed_short, args.prompt_len, args.seed)
        long = make_prompts(tokenizer, args.mixed_long, args.capacity_prompt_len, args.seed + 1)
        # warm-up outside the timed part (first-step allocations, lazy kernel builds)
        for index, prompt in enumerate(make_prompts(tokenizer, 2, 64, args.seed + 2)):
            engine.add_request(GenerateRequest(f"warm{index}", tuple(prompt), greedy(2)))
        while engine.has_work:
            engine.step()
        engine.scheduler.chunk_policy.chosen.clear()
        engine.scheduler.arbiter.actions.clear()
        engine.scheduler.arbiter.num_victims = 0
        peak = {"activations": 0, "kv": 0}
        pool, step, timeline = engine.pool, engine.step, []
        started = time.perf_counter()

        def observed_step(step=step, pool=pool, peak=peak, timeline=timeline, engine=engine, started=started):
            outputs = step()
            peak["activations"] = max(peak["activations"], pool.num_held("activations"))
            peak["kv"] = max(peak["kv"], pool.num_held("kv"))
            telemetry = pool.telemetry()
            timeline.append({"step": len(timeline) + 1, "t_s": time.perf_counter() - started,
                             "chunks": dict(telemetry.chunks_per_client), "free_chunks": telemetry.num_free_chunks,
                             "running": len(engine.scheduler.running)})
            return outputs

        engine.step = observed_step  # this instance only: reads the balloons after every step
        entry = run_one(engine, short, long, args)
        entry.update(timeline=timeline, chunk_bytes=pool.chunk_bytes,
                     peak_activation_bytes=peak["activations"] * pool.chunk_bytes,
                     peak_kv_bytes=peak["kv"] * pool.chunk_bytes, dtype=str(engine.dtype).replace("torch.", ""),
                     max_num_batched_tokens=engine.config.max_num_batched_tokens)
        result["configs"][name] = entry
        engine.close()
    return result


def plot_timelines(result: dict, path: str) -> None:
    """The pool's balloons after every step, one panel per configuration (the load test's memory plot).
    The weights, constant, are left out so that the KV and activations trade is visible."""
    from loadtest.report import plot_memory

    points = [MemoryPoint(float(point["step"]), name, 1,
                          {client: chunks * entry["chunk_bytes"] for client, chunks in point["chunks"].items()
                           if client != "weights"},
                          point["free_chunks"] * entry["chunk_bytes"], None)
              for name, entry in result["configs"].items() for point in entry["timeline"]]
    plot_memory(points, Path(path), f"mixed, {result['budget_bytes'] / GIB:.2f} GiB less the weights",
                panel="configuration", xlabel="engine step")


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def format_mixed(result: dict, args) -> str:
    configs = result["configs"]
    names = list(configs)
    keys = [
        ("long TTFT p50 ms", "long_ttft_p50_ms"), ("long TTFT p99 ms", "long_ttft_p99_ms"),
        ("short TTFT p50 ms", "short_ttft_p50_ms"), ("short TPOT p50 ms", "short_tpot_p50_ms"),
        ("short TPOT p99 ms", "short_tpot_p99_ms"), ("short decode tok/s", "decode_tok_s"),
        ("preemptions", "num_preemptions"), ("swapped by the arbiter", "arbiter_swaps"),
        ("steps", "num_steps"), ("mean running", "mean_running"),
        ("max running", "max_running"), ("wall s", "wall_s"),
    ]
    rows = [["", *names]]
    rows += [[label, *[_fmt(configs[n][key]) for n in names]] for label, key in keys]
    rows.append(["activations reserved", *[f"{configs[n]['activation_reserved_bytes'] / MIB:.1f} MiB" for n in names]])
    rows.append(["peak activations held", *[f"{configs[n]['peak_activation_bytes'] / MIB:.1f} MiB" for n in names]])
    rows.append(["peak KV held", *[f"{configs[n]['peak_kv_bytes'] / MIB:.1f} MiB" for n in names]])
    rows.append(["step budgets chosen", *[" ".join(f"{k}:{v}" for k, v in configs[n]["chunk_budgets"].items())
                                          for n in names]])
    first = configs[names[0]]
    head = (f"\n== mixed: {args.mixed_short} short ({args.prompt_len} in / {args.output_len} out) at once, "
            f"{args.mixed_long} long ({args.capacity_prompt_len} in / {args.mixed_long_output_len} out) one every "
            f"{args.mixed_gap} steps; budget {result['budget_bytes'] / GIB:.2f} GiB, {first['dtype']}, chunk "
            f"{first['max_num_batched_tokens']} (fixed / floor) .. {result['ceiling']} (ceiling)")
    loads = "; ".join(f"{n}: {configs[n]['load']}" for n in names)
    return "\n".join([head, format_table(rows), loads])
