"""Vocab mode of the offline benchmark (issue 17 (c)): a 262K-vocabulary model at batch 32-64, with and without
logprobs, elastic vs static at equal budgets.

For each batch size B (`--vocab-batches`, `max_num_seqs` = B) at its budget (`--vocab-budgets-gib`), two engines
are built side by side: elastic (one pool: each step's workspace, the model's fp32 logits rows and the sampler's
temporaries, comes from the pool when the step runs, sized for that step's rows) and static (the activation
share reserved at start for the peak: the largest step, and every row drawn, filtered and reporting logprobs).
B requests of `--prompt-len` tokens (`--output-len` out, greedy, ignore_eos) are submitted at once, without and
then with logprobs (`--vocab-logprobs`), elastic then static each time, so slow spells of the shared box hit
both. Deterministic: the reservation, the largest step's workspace, how many requests decode at once (the
capacity at that budget) and the preemptions. Timed: decode tok/s (tokens of pure decode steps over their time).
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from loadtest.offline.engine_runner import GIB, MIB, build_engine, make_prompts, run_engine
from loadtest.offline.tables import format_table, load_average

POLICIES = ("elastic", "static")


def run_vocab(args) -> dict:
    if len(args.vocab_batches) != len(args.vocab_budgets_gib):
        raise ValueError("--vocab-batches and --vocab-budgets-gib need one budget per batch size")
    model = args.model or "gemma3-270m"
    result: dict = {"model": model, "settings": []}
    for batch, gib in zip(args.vocab_batches, args.vocab_budgets_gib, strict=True):
        budget = int(gib * GIB)
        engines = {}
        try:
            for policy in POLICIES:
                engines[policy] = build_engine(args, model=model, pool_policy=policy, device_memory_bytes=budget,
                                               max_num_seqs=batch, max_model_len=args.prompt_len + args.output_len + 16)
            first = engines["elastic"]
            prompts = make_prompts(first.tokenizer, batch, args.prompt_len, args.seed)
            for policy, engine in engines.items():  # first-step allocations and lazy kernel builds, untimed
                run_engine(engine, prompts[:2], 2, f"warm-{policy}")
            for sampling, params in _settings(args):
                setting = {"batch": batch, "budget_bytes": budget, "logprobs": params.logprobs, "sampling": sampling,
                           "policies": {}}
                for policy, engine in engines.items():
                    run = run_engine(engine, prompts, args.output_len, f"v{batch}-{sampling}-{policy}", params)
                    shares = getattr(engine.pool.policy, "shares", {})
                    setting["policies"][policy] = {
                        "reserved_bytes": shares.get("activations", 0) * engine.pool.chunk_bytes,
                        "peak_step_workspace_bytes": run["peak_step_workspace_bytes"],
                        "peak_activation_bytes": run["peak_activation_bytes"],
                        "decoding_at_once": run["peak_decoding"], "admitted": run["peak_running"],
                        "num_preemptions": run["num_preemptions"], "num_steps": run["num_steps"],
                        "decode_tok_s": run["decode_tok_s"], "wall_s": run["wall_s"], "load": load_average(),
                        "token_ids": run["token_ids"],
                    }
                result["settings"].append(setting)
            result["dtype"] = str(first.dtype).replace("torch.", "")
            result["vocab_size"] = first.model_config.vocab_size
        finally:
            for engine in engines.values():
                engine.close()
    # greedy tokens are the same whatever the pool and logprobs: compared with elastic's first greedy run of the
    # batch size; drawn (seeded) tokens with elastic's drawn run
    expected = {(s["batch"], s["sampling"] == "top_p"): s["policies"]["elastic"]["token_ids"]
                for s in reversed(result["settings"])}  # the first run of each kind wins
    for setting in result["settings"]:
        for entry in setting["policies"].values():
            reference = expected[setting["batch"], setting["sampling"] == "top_p"]
            entry["same_tokens"] = sum(a == b for a, b in zip(entry["token_ids"], reference, strict=True))
    for setting in result["settings"]:
        for entry in setting["policies"].values():
            del entry["token_ids"]
    return result


def _settings(args) -> list[tuple[str, SamplingParams]]:
    """Greedy without and with logprobs; with `--vocab-top-p`, also drawn rows (temperature 1, top-p, seeded:
    two more vocabulary rows each and the filter's scratch)."""
    greedy = dict(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    known = {"greedy": SamplingParams(**greedy), "logprobs": SamplingParams(**greedy, logprobs=args.vocab_logprobs),
             "top_p": SamplingParams(temperature=1.0, top_p=args.vocab_top_p, seed=args.seed,
                                     max_tokens=args.output_len, ignore_eos=True)}
    chosen = getattr(args, "vocab_sampling", ("greedy", "logprobs"))
    unknown = set(chosen) - set(known)
    if unknown:
        raise ValueError(f"--vocab-sampling: unknown settings {sorted(unknown)} (of {sorted(known)})")
    return [(name, known[name]) for name in chosen]


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _sampling_label(setting: dict, args) -> str:
    sampling = setting.get("sampling", "logprobs" if setting["logprobs"] is not None else "greedy")
    if sampling == "top_p":
        return f"top-p {args.vocab_top_p} (seeded)"
    return f"greedy, logprobs {setting['logprobs']}" if sampling == "logprobs" else "greedy"


def format_vocab(result: dict, args) -> str:
    rows = [["batch", "budget", "sampling", "policy", "reserved at start", "largest step workspace",
             "peak activations held", "decoding at once", "preemptions", "decode tok/s", "same greedy tokens",
             "load avg"]]
    ratios = []
    for setting in result["settings"]:
        for policy, entry in setting["policies"].items():
            rows.append([str(setting["batch"]), f"{setting['budget_bytes'] / GIB:.2f} GiB",
                         _sampling_label(setting, args), policy,
                         f"{entry['reserved_bytes'] / MIB:.1f} MiB",
                         f"{entry['peak_step_workspace_bytes'] / MIB:.1f} MiB",
                         f"{entry['peak_activation_bytes'] / MIB:.1f} MiB",
                         f"{entry['decoding_at_once']} of {setting['batch']}", str(entry["num_preemptions"]),
                         f"{entry['decode_tok_s']:.1f}" if entry["decode_tok_s"] else "-",
                         f"{entry['same_tokens']}/{setting['batch']}", entry["load"]])
        elastic, static = setting["policies"]["elastic"], setting["policies"]["static"]
        ratios.append(f"batch {setting['batch']}, {_sampling_label(setting, args)}: capacity "
                      f"{_ratio(elastic['decoding_at_once'], static['decoding_at_once'])}, decode tok/s "
                      f"{_ratio(elastic['decode_tok_s'], static['decode_tok_s'])}")
    head = (f"\n== vocab: {result['model']} ({result.get('vocab_size', '?'):,} vocab, {result.get('dtype', '?')}), "
            f"B requests of {args.prompt_len} in / {args.output_len} out at once, elastic vs static "
            "(same tokens: greedy rows against elastic's greedy run, drawn rows against elastic's drawn run)")
    return "\n".join([head, format_table(rows), "elastic/static: " + "; ".join(ratios)])
