"""Served batch-1 TPOT against the engine's own, and what the gap is made of.

Three measurements of the same thing, a lone greedy request (~128-token prompt, 128 output tokens,
ignore_eos), alternated round by round (this VM's speed drifts within minutes):

  engine alone   the YAML's engine (deployments.server.build_engine: the replica's own AsyncEngine), in a
                 child process, with nothing else running;
  beside server  the same child while our server (`serve run CONFIG`) is up and idle: Ray's daemons, the
                 Serve controller and proxy, the cluster controller and the replica's idle loop share the cores;
  served         the server at concurrency 1, streaming through the proxy (loadtest.bench.serve's client).

"served / alone" is the issue's ratio; "beside / alone" is what the idle cluster alone costs the engine, so
"served / beside" is what serving the request (HTTP, streaming, the replica's handlers) adds on top.

    python -m loadtest.bench.served_tpot [--config serve_config.yaml] [--rounds 2] [--requests 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from loadtest.bench.serve import cpu_flags, load_average, make_prompts, measure, ours_command, serving

ENGINE_ONLY = "--engine-only"


@dataclass(frozen=True)
class Round:
    alone_ms: float
    beside_ms: float
    served_ms: float


def _row(label: str, r: Round) -> str:
    return (f"| {label} | {r.alone_ms:.1f} | {r.beside_ms:.1f} | {r.served_ms:.1f} "
            f"| {r.served_ms / r.alone_ms:.2f}x | {r.beside_ms / r.alone_ms:.2f}x |")


def table(rounds: Sequence[Round]) -> str:
    lines = ["| round | engine alone ms | beside the idle server ms | served ms | served / alone | beside / alone |",
             "|---|---|---|---|---|---|"]
    lines += [_row(str(index), r) for index, r in enumerate(rounds, 1)]
    if len(rounds) > 1:  # medians per column, then their ratios
        lines.append(_row("median", Round(statistics.median(r.alone_ms for r in rounds),
                                          statistics.median(r.beside_ms for r in rounds),
                                          statistics.median(r.served_ms for r in rounds))))
    return "\n".join(lines)


# ---- the engine alone (the child process) ----------------------------------------------------------------
def engine_tpot_ms(config: str, prompts: Sequence[str], num_requests: int, output_tokens: int) -> float:
    """Mean TPOT of `num_requests` lone requests on the YAML's engine, after one short warm-up request."""
    import yaml

    from deployments.args import app_args_in
    from deployments.server import build_engine, set_torch_threads
    from engine.api import GenerateRequest
    from engine.sampling_params import SamplingParams
    from engine.text.tokenizer import encode_prompt

    apps = app_args_in(yaml.safe_load(Path(config).read_text()))
    if not apps:
        raise ValueError(f"{config} has no application with import_path deployments.app:build_app")
    args = apps[0]
    set_torch_threads(args.threads_per_rank())

    async def run() -> float:
        engine = build_engine(args).engine
        await engine.start()
        try:
            tpots = []
            for index in range(num_requests + 1):
                ids = tuple(encode_prompt(engine.tokenizer, prompts[index % len(prompts)]))
                max_tokens = output_tokens if index else 8
                params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
                times: list[float] = []
                async for output in engine.generate(GenerateRequest(f"tpot-{index}", ids, params)):
                    times += [time.perf_counter()] * len(output.new_token_ids)
                if index:  # the first is the warm-up
                    tpots.append((times[-1] - times[0]) / (len(times) - 1) * 1e3)
            return sum(tpots) / len(tpots)
        finally:
            await engine.shutdown()

    return asyncio.run(run())


def _engine_in_child(args: argparse.Namespace) -> float:
    command = [sys.executable, "-m", "loadtest.bench.served_tpot", ENGINE_ONLY, "--config", args.config,
               "--requests", str(args.requests), "--output-tokens", str(args.output_tokens),
               "--prompt-tokens", str(args.prompt_tokens), "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["tpot_ms"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml", help="our Serve config (serve run CONFIG)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (alone, beside, served)")
    parser.add_argument("--requests", type=int, default=4, help="lone requests per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="where CONFIG's server answers")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(ENGINE_ONLY, action="store_true", help=argparse.SUPPRESS)  # the child's side
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = make_prompts(16, args.prompt_tokens, args.seed)
    if args.engine_only:
        print(json.dumps({"tpot_ms": engine_tpot_ms(args.config, prompts, args.requests, args.output_tokens)}))
        return
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; load avg at start {load_average()}", flush=True)
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "bench-served-tpot.log"
    rounds = []
    for index in range(args.rounds):
        alone = _engine_in_child(args)
        with serving(*ours_command(args.config), args.url, log, args.start_timeout):
            measure(args.url, prompts, [1], 1, 8)  # the server's warm-up
            beside = _engine_in_child(args)
            served = measure(args.url, prompts, [1], args.requests, args.output_tokens)[0].tpot_mean_ms
        rounds.append(Round(alone, beside, served))
        print(f"round {index + 1}: alone {alone:.1f} ms, beside {beside:.1f} ms, served {served:.1f} ms "
              f"(load avg {load_average()})", flush=True)
    print(f"\nbatch-1 TPOT, {args.prompt_tokens}-token prompts, {args.output_tokens} output tokens, greedy "
          f"({args.config}); CPU flags: {cpu_flags()}\n{table(rounds)}")


if __name__ == "__main__":
    main()
