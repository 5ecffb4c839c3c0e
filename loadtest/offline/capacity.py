"""Capacity mode of the offline benchmark: how many long requests run at once at a fixed device budget.

For each pool policy the same engine is built at the same budget:
- `elastic`: weights, KV and the activation workspace share the pool; activations take what the step
  being run needs and give it back to KV afterwards.
- `static`: the baseline GPU servers use: KV is sized at start-up after reserving the activation
  workspace for the largest step the scheduler may plan (max_num_batched_tokens + max_num_seqs tokens);
  EngineConfig(pool_policy="static") makes that split.

The capacity is first predicted from the chunk accounting alone (KV chunks one request needs at its final
length, chunks the policy leaves for KV), then confirmed by running predicted + 1 requests at once: the
engine must run exactly `predicted` of them concurrently with no preemption, the extra one waiting.
"""

from __future__ import annotations

import time

from engine.core.engine import LLMEngine
from engine.core.sampling_workspace import SampledRows
from loadtest.offline.engine_runner import GIB, MIB, build_engine, make_prompts, run_engine
from loadtest.offline.tables import format_table, load_average

SWEEP_GIB = (0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0)  # budgets whose accounting is printed next to the measured one


def predict(engine: LLMEngine, prompt_len: int, output_len: int, num_chunks: int | None = None) -> dict:
    """Requests of `prompt_len` + `output_len` tokens that fit at once, from the chunk accounting only
    (`num_chunks`: the same engine at another budget; the static shares of weights and activations stay)."""
    pool, config = engine.pool, engine.config
    num_chunks = pool.num_chunks if num_chunks is None else num_chunks
    per_request = engine.kv.chunks_to_grow(None, prompt_len + output_len)
    weights = pool.num_held("weights")
    largest_step = config.max_num_batched_tokens

    def step_chunks(num_tokens: int, num_running: int) -> int:
        return engine.runner.activation_chunks(min(largest_step, num_tokens), SampledRows.plain(max(1, num_running)))

    def fits_elastic(count: int) -> bool:
        """The scheduler admits the count-th request in a step with the others' decodes and its prompt chunk,
        and before that may have run a full token budget of prompt chunks with one request fewer resident."""
        last = count * per_request + step_chunks(count - 1 + prompt_len, count)
        before = (count - 1) * per_request + step_chunks(largest_step, count - 1)
        return max(last, before) <= kv_chunks

    if config.pool_policy == "static":
        shares = pool.policy.shares
        reserved = shares["activations"]
        kv_chunks = max(0, num_chunks - shares["weights"] - reserved)
        capacity = min(kv_chunks // per_request, config.max_num_seqs)
    else:  # KV and the running step's activations share everything the weights leave
        kv_chunks, reserved = max(0, num_chunks - weights), 0
        capacity = 0
        while capacity < config.max_num_seqs and fits_elastic(capacity + 1):
            capacity += 1
    step_needs = step_chunks(max(largest_step, capacity - 1 + prompt_len), capacity)
    return {
        "policy": config.pool_policy,
        "chunk_bytes": pool.chunk_bytes,
        "num_chunks": num_chunks,
        "weight_bytes": weights * pool.chunk_bytes,
        "activation_reserved_bytes": reserved * pool.chunk_bytes,
        "engine_peak_activation_bytes": engine.peak_activation_bytes,
        "largest_step_activation_bytes": step_needs * pool.chunk_bytes,
        "kv_chunks": kv_chunks,
        "kv_bytes": kv_chunks * pool.chunk_bytes,
        "chunks_per_request": per_request,
        "predicted": capacity,
    }


def run_capacity(args, tokenizer=None) -> dict:
    prompt_len, output_len = args.capacity_prompt_len, args.capacity_output_len
    requested_confirm_len = args.confirm_output_len or output_len
    budget = int(args.budget_gib * GIB)
    result: dict = {"budget_bytes": budget, "prompt_len": prompt_len, "output_len": output_len,
                    "confirm_output_len": None, "policies": {}}
    for policy in ("elastic", "static"):
        engine = build_engine(args, tokenizer=tokenizer, pool_policy=policy, device_memory_bytes=budget,
                              max_num_seqs=args.max_num_seqs or 64, max_model_len=None)
        tokenizer = engine.tokenizer
        result.update(dtype=str(engine.dtype).replace("torch.", ""), max_num_seqs=engine.config.max_num_seqs,
                      max_num_batched_tokens=engine.config.max_num_batched_tokens)
        entry = predict(engine, prompt_len, output_len)
        entry["sweep"] = {f"{gib:g}": predict(engine, prompt_len, output_len, int(gib * GIB) // entry["chunk_bytes"])
                          ["predicted"] for gib in SWEEP_GIB}
        if not args.no_confirm:
            # every request must still be decoding when the last one is admitted (one prefill after another),
            # or a short confirming run would never hold them all at once
            prefill_steps = -(-prompt_len // engine.config.max_num_batched_tokens)
            confirm_len = min(output_len, max(requested_confirm_len, prefill_steps * (entry["predicted"] + 1)))
            result["confirm_output_len"] = max(result["confirm_output_len"] or 0, confirm_len)
            prompts = make_prompts(tokenizer, entry["predicted"] + 1, prompt_len, args.seed + 10)
            started = time.perf_counter()
            run = run_engine(engine, prompts, confirm_len, f"cap-{policy}")
            # a shorter confirming run holds the same KV only if the final page count is the same
            entry["confirm_kv_exact"] = engine.kv.chunks_to_grow(None, prompt_len + confirm_len) == \
                entry["chunks_per_request"]
            entry.update(observed=run["peak_decoding"], admitted=run["peak_running"],
                         num_preemptions=run["num_preemptions"], peak_kv_bytes=run["peak_kv_bytes"],
                         peak_activation_held_bytes=run["peak_activation_bytes"],
                         peak_step_activation_bytes=run["peak_planned_activation_bytes"],
                         confirm_wall_s=time.perf_counter() - started, load=load_average())
            entry["confirmed"] = entry["observed"] == entry["predicted"] and run["num_preemptions"] == 0
        result["policies"][policy] = entry
        engine.close()
    elastic, static = result["policies"]["elastic"], result["policies"]["static"]
    result["predicted_ratio"] = elastic["predicted"] / static["predicted"] if static["predicted"] else None
    if "observed" in elastic and static.get("observed"):
        result["observed_ratio"] = elastic["observed"] / static["observed"]
    return result


def _mib(num_bytes) -> str:
    return "-" if num_bytes is None else f"{num_bytes / MIB:,.1f} MiB"


def format_capacity(result: dict) -> str:
    policies = result["policies"]
    names = list(policies)

    def row(label, pick):
        return [label, *[pick(policies[name]) for name in names]]

    rows = [
        ["", *names],
        row("weights", lambda e: _mib(e["weight_bytes"])),
        row("activations reserved at start", lambda e: _mib(e["activation_reserved_bytes"]) if e[
            "activation_reserved_bytes"] else "0 (on demand)"),
        row("largest step needs (accounting)", lambda e: _mib(e["largest_step_activation_bytes"])),
        row("KV chunks for requests", lambda e: f"{e['kv_chunks']:,} ({_mib(e['kv_bytes'])})"),
        row("KV chunks per request",
            lambda e: f"{e['chunks_per_request']:,} ({_mib(e['chunks_per_request'] * e['chunk_bytes'])})"),
        row("predicted capacity", lambda e: str(e["predicted"])),
    ]
    if result["confirm_output_len"] is not None:
        rows += [
            row("decoding at once (of predicted+1)", lambda e: f"{e['observed']} of {e['predicted'] + 1}"),
            row("admitted at once", lambda e: str(e["admitted"])),
            row("preemptions", lambda e: str(e["num_preemptions"])),
            row("peak KV used", lambda e: _mib(e["peak_kv_bytes"])),
            row("peak activations held (run)", lambda e: _mib(e["peak_activation_held_bytes"])),
            row("step activations charged to KV", lambda e: _mib(e["peak_step_activation_bytes"])),
            row("confirmed", lambda e: "yes" if e["confirmed"] else "NO"),
            row("confirm run wall s", lambda e: f"{e['confirm_wall_s']:.1f} ({e['load']})"),
        ]
    elastic = policies["elastic"]
    out = [
        f"\n== capacity: {result['prompt_len']}-token prompts + {result['output_len']} out, budget "
        f"{result['budget_bytes'] / GIB:.2f} GiB ({result['budget_bytes']:,} B), {result['dtype']}, "
        f"max_num_batched_tokens {result['max_num_batched_tokens']}, max_num_seqs {result['max_num_seqs']}",
        format_table(rows),
        f"engine.peak_activation_bytes (static reservation basis) = {elastic['engine_peak_activation_bytes']:,} B",
    ]
    ratio = result.get("predicted_ratio")
    line = f"elastic/static: predicted {ratio:.2f}x" if ratio else "elastic/static: static fits none"
    if result.get("observed_ratio"):
        line += f", observed {result['observed_ratio']:.2f}x"
    out.append(line)
    sweep = "  ".join(f"{gib}: {policies['elastic']['sweep'][gib]}/{policies['static']['sweep'][gib]}"
                      for gib in policies["elastic"]["sweep"])
    out.append(f"accounting at other budgets (GiB: elastic/static): {sweep}")
    static_entry = policies["static"]
    spare = (static_entry["activation_reserved_bytes"] - elastic["largest_step_activation_bytes"]) / (
        elastic["chunks_per_request"] * elastic["chunk_bytes"])
    out.append(f"static reserves {_mib(static_entry['activation_reserved_bytes'])} for activations, elastic's largest "
               f"step at capacity needs {_mib(elastic['largest_step_activation_bytes'])}: on average elastic holds "
               f"{spare:.2f} more request(s) at any budget (+1 wherever the budget falls on that margin)")
    for name, entry in policies.items():
        if entry.get("observed") is None or entry["confirmed"]:
            continue
        if entry["num_preemptions"]:
            out.append(f"note: {name} preempted {entry['num_preemptions']} times: the engine admitted more requests "
                       f"({entry['admitted']} at once) than the KV accounting holds ({entry['predicted']})")
        else:
            out.append(f"note: {name} ran {entry['observed']} at once although the KV accounting holds "
                       f"{entry['predicted']}: the engine's admission is stricter than the accounting")
    confirm = result["confirm_output_len"]
    if confirm is not None and confirm != result["output_len"]:
        exact = all(entry["confirm_kv_exact"] for entry in policies.values())
        out.append(f"note: confirmed with {confirm} output tokens instead of {result['output_len']} (CPU time; enough "
                   "for all to overlap); "
                   + ("the KV pages per request are the same, so the accounting is unchanged" if exact else
                      "WARNING: that needs fewer KV pages per request than the full length; the prediction "
                      "uses the full length"))
    return "\n".join(out)
