"""Served speed against vLLM-CPU: both servers, one streaming client, one ratio table.

Starts our server from a Serve config (`serve run CONFIG`), measures it, stops it, then does the same with the
peer from the repository's harness (loadtest/peers/vllm_cpu/serve.sh, set up by `make peer`), so the two never
share the cores. `--interleave` instead starts both and alternates them level by level (ours at c, vLLM at c,
then the next c): on a VM whose speed drifts (2x within ten minutes on the AVX2 EPYC of 2026-12-07) the two
sides of a ratio then run minutes apart rather than a quarter of an hour, at the cost of the idle server's
background work (Ray's daemons, vLLM's idle engine) during the other's level.

At each concurrency the same closed-loop client (asyncio + aiohttp, one streaming
/v1/completions request per user at a time, ~128-token prompts, 128 output tokens, greedy, ignore_eos) sends
`--requests-per-user` requests per user after one warm-up request. Prints output tok/s, TTFT p50/p99 and mean
TPOT for both and their ratios, with the CPU flags that matter and the load average around each level (the box
may be shared: say so with the numbers); then where each server says its first tokens' time went (its own
/metrics, read before and after the level: mean time queued and prefilling; ours `elastic:`, vLLM's `vllm:`,
the same histogram names).

    python -m loadtest.bench.serve [--config serve_config.yaml] [--concurrency 1 8 32] [--only ours|vllm]
                                   [--interleave]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import aiohttp

from loadtest.metrics import RequestRecord, percentile
from loadtest.openai_stream import ENDPOINT_PATHS, RequestOptions, StreamTimer, request_body
from loadtest.peers.vllm_cpu import SERVE_SCRIPT, find_peer_dir, setup_hint
from loadtest.text import TextMaker
from loadtest.tokens import load_token_counter

CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclasses.dataclass(frozen=True)
class Level:
    """One concurrency level of one server."""

    concurrency: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_mean_ms: float
    num_requests: int
    num_errors: int
    load: str
    # each request: (sent at, s from the level's first send; TTFT s or None; output tokens; error or "")
    requests: tuple[tuple[float, float | None, int, str], ...] = ()
    # the server's own split of its first tokens' time over the level (mean ms), where its /metrics has one
    queue_mean_ms: float | None = None
    prefill_mean_ms: float | None = None

    @staticmethod
    def of(concurrency: int, records: Sequence[RequestRecord], load: str) -> Level:
        ok = [record for record in records if record.is_ok and record.ttft_s is not None]
        window = max(r.end_time for r in records) - min(r.start_time for r in records)
        ttfts = [record.ttft_s * 1e3 for record in ok]
        tpots = [record.tpot_s * 1e3 for record in ok if record.tpot_s is not None]
        return Level(concurrency, sum(record.num_output_tokens for record in ok) / window,
                     percentile(ttfts, 50) if ttfts else float("nan"), percentile(ttfts, 99) if ttfts else float("nan"),
                     sum(tpots) / len(tpots) if tpots else float("nan"), len(records), len(records) - len(ok), load,
                     request_rows(records))


def request_rows(records: Sequence[RequestRecord]) -> tuple[tuple[float, float | None, int, str], ...]:
    """Each request's send time (from the first send), TTFT, output tokens and error, in send order: a burst's
    waves show in them (--json keeps them)."""
    first = min(record.start_time for record in records)
    return tuple((round(r.start_time - first, 4), None if r.ttft_s is None else round(r.ttft_s, 4),
                  r.num_output_tokens, r.error or "") for r in sorted(records, key=lambda r: r.start_time))


def cpu_flags() -> str:
    try:
        present = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return "unknown"
    return " ".join(f"{flag}={'yes' if flag in present else 'no'}" for flag in CPU_FLAGS)


def load_average() -> str:
    return "{:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


# ---- the client ------------------------------------------------------------------------------------
async def _one_request(session: aiohttp.ClientSession, url: str, body: dict, request_id: str) -> RequestRecord:
    timer = StreamTimer(request_id, "completions", time.time(), body["max_tokens"])
    started = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                text = await response.text()
                return timer.finish(time.perf_counter() - started, f"HTTP {response.status}: {text[:200]}",
                                    response.status)
            async for data in response.content.iter_any():
                timer.feed(data, time.perf_counter() - started)
        return timer.finish(time.perf_counter() - started)
    except aiohttp.ClientError as error:
        return timer.finish(time.perf_counter() - started, f"{type(error).__name__}: {error}", None)


SPLIT_HISTOGRAMS = ("request_queue_time_seconds", "request_prefill_time_seconds")


def split_totals(metrics_text: str) -> dict[str, float]:
    """Sums and counts of the TTFT-split histograms in a Prometheus text page, over every label set and either
    prefix (`elastic:`, `vllm:`): {"request_queue_time_seconds_sum": ..., ..._count: ...}."""
    totals: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("#") or ":" not in line:
            continue
        name = line.split("{")[0].split(" ")[0].split(":", 1)[1]
        histogram, _, part = name.rpartition("_")
        if histogram in SPLIT_HISTOGRAMS and part in ("sum", "count"):
            totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def split_means_ms(before: dict[str, float], after: dict[str, float]) -> tuple[float | None, float | None]:
    """Mean ms queued and prefilling over what `after` added to `before` (None where nothing was observed)."""
    def mean(name: str) -> float | None:
        count = after.get(name + "_count", 0.0) - before.get(name + "_count", 0.0)
        return (after[name + "_sum"] - before.get(name + "_sum", 0.0)) / count * 1e3 if count > 0 else None
    return mean(SPLIT_HISTOGRAMS[0]), mean(SPLIT_HISTOGRAMS[1])


async def _split_totals(session: aiohttp.ClientSession, base_url: str) -> dict[str, float]:
    try:
        async with session.get(base_url + "/metrics") as response:
            return split_totals(await response.text()) if response.status == 200 else {}
    except aiohttp.ClientError:
        return {}


async def _run_level(base_url: str, model: str, prompts: list[str], concurrency: int, requests_per_user: int,
                     output_tokens: int) -> tuple[list[RequestRecord], tuple[float | None, float | None]]:
    url = base_url + ENDPOINT_PATHS["completions"]
    options = RequestOptions(model=model)
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await _one_request(session, url, request_body("completions", prompts[0], [], 8, options), "warm-up")
        split_before = await _split_totals(session, base_url)
        records: list[RequestRecord] = []

        async def user(index: int) -> None:
            for turn in range(requests_per_user):
                prompt = prompts[(index * requests_per_user + turn) % len(prompts)]
                body = request_body("completions", prompt, [], output_tokens, options)
                records.append(await _one_request(session, url, body, f"u{index}-{turn}"))

        await asyncio.gather(*(user(index) for index in range(concurrency)))
        return records, split_means_ms(split_before, await _split_totals(session, base_url))


def measure(base_url: str, prompts: list[str], concurrencies: Sequence[int], requests_per_user: int,
            output_tokens: int) -> list[Level]:
    model = _model_name(base_url)
    levels = []
    for concurrency in concurrencies:
        before = load_average()
        records, (queue_ms, prefill_ms) = asyncio.run(_run_level(base_url, model, prompts, concurrency,
                                                                 requests_per_user, output_tokens))
        levels.append(dataclasses.replace(Level.of(concurrency, records, f"{before} -> {load_average()}"),
                                          queue_mean_ms=queue_ms, prefill_mean_ms=prefill_ms))
        print(f"  {base_url} c={concurrency}: {dataclasses.replace(levels[-1], requests=())}", file=sys.stderr,
              flush=True)
    return levels


def _model_name(base_url: str) -> str:
    async def fetch() -> str:
        async with aiohttp.ClientSession() as session, session.get(base_url + "/v1/models") as response:
            return (await response.json())["data"][0]["id"]

    return asyncio.run(fetch())


# ---- the servers -----------------------------------------------------------------------------------
def _wait_healthy(base_url: str, process: subprocess.Popen, timeout_s: float) -> float:
    started = time.perf_counter()

    async def probe() -> bool:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session, \
                    session.get(base_url + "/v1/models") as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode} before answering {base_url}")
        if asyncio.run(probe()):
            return time.perf_counter() - started
        time.sleep(1.0)
    raise TimeoutError(f"{base_url} not healthy within {timeout_s} s")


def _stop(process: subprocess.Popen, leader_grace_s: float = 60.0) -> None:
    """SIGTERM to the server's own process first (`python -m deployments.launch` drains, then shuts Serve and
    its local Ray down), then to its process group (`serve run` dies at once and leaves Ray's children)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=leader_grace_s)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGTERM)  # its own process group: whatever Ray children are left
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str], base_url: str, log_path: Path,
            start_timeout_s: float) -> Iterator[float]:
    """A server from `command`, up (yields the seconds it took to answer) until the block ends."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            start_s = _wait_healthy(base_url, process, start_timeout_s)
            print(f"  {base_url} healthy after {start_s:.1f} s", file=sys.stderr, flush=True)
            yield start_s
        finally:
            _stop(process)


def run_server(command: list[str], env: dict[str, str], base_url: str, log_path: Path, measure_fn,
               start_timeout_s: float):
    with serving(command, env, base_url, log_path, start_timeout_s) as start_s:
        return start_s, measure_fn()


def ours_command(config: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    serve = Path(sys.executable).parent / "serve"  # as a user runs it: Ray's workers at its nice 15 (README)
    return [str(serve), "run", config], env


def peer_command(folder: Path, port: int, dtype: str = "bfloat16") -> tuple[list[str], dict[str, str]]:
    """serve.sh's own `--dtype bfloat16` is overridden by a later one (argparse: the last wins)."""
    env = dict(os.environ, PORT=str(port))
    env.pop("PYTHONPATH", None)
    return ["bash", str(SERVE_SCRIPT), str(folder)] + ([] if dtype == "bfloat16" else ["--dtype", dtype]), env


# ---- the table -------------------------------------------------------------------------------------
def ratio_table(ours: Sequence[Level], peer: Sequence[Level]) -> str:
    """Ratios are ours / vLLM for tok/s (higher is better) and vLLM / ours for times (>1: ours faster)."""
    header = ("| concurrency | out tok/s ours / vLLM | ratio | TTFT p50 ms ours / vLLM | TTFT p99 ms ours / vLLM "
              "| ratio p99 | mean TPOT ms ours / vLLM | ratio | load avg (ours; vLLM) |")
    lines = [header, "|" + "---|" * 9]
    for a, b in zip(ours, peer, strict=True):
        lines.append(
            f"| {a.concurrency} | {a.output_tok_s:.1f} / {b.output_tok_s:.1f} | {a.output_tok_s / b.output_tok_s:.2f}x "
            f"| {a.ttft_p50_ms:.0f} / {b.ttft_p50_ms:.0f} | {a.ttft_p99_ms:.0f} / {b.ttft_p99_ms:.0f} "
            f"| {b.ttft_p99_ms / a.ttft_p99_ms:.2f}x | {a.tpot_mean_ms:.1f} / {b.tpot_mean_ms:.1f} "
            f"| {b.tpot_mean_ms / a.tpot_mean_ms:.2f}x | {a.load}; {b.load} |")
    return "\n".join(lines)


def split_table(results: dict[str, Sequence[Level]]) -> str:
    """Each server's own account of its first tokens (mean ms queued + prefilling), level by level."""
    def cell(level: Level) -> str:
        if level.queue_mean_ms is None or level.prefill_mean_ms is None:
            return "-"
        return f"{level.queue_mean_ms:.0f} + {level.prefill_mean_ms:.0f}"
    names = list(results)
    lines = ["| concurrency | " + " | ".join(f"{name}: queued + prefilling ms (mean)" for name in names) + " |",
             "|---|" + "---|" * len(names)]
    for row in zip(*(results[name] for name in names), strict=True):
        lines.append(f"| {row[0].concurrency} | " + " | ".join(cell(level) for level in row) + " |")
    return "\n".join(lines)


def single_table(name: str, levels: Sequence[Level]) -> str:
    lines = [f"| concurrency | {name} out tok/s | TTFT p50 / p99 ms | mean TPOT ms | errors | load avg |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {x.concurrency} | {x.output_tok_s:.1f} | {x.ttft_p50_ms:.0f} / {x.ttft_p99_ms:.0f} "
              f"| {x.tpot_mean_ms:.1f} | {x.num_errors}/{x.num_requests} | {x.load} |" for x in levels]
    return "\n".join(lines)


def make_prompts(num_prompts: int, prompt_tokens: int, seed: int) -> list[str]:
    maker = TextMaker(load_token_counter("smollm2"), random.Random(seed))
    return [maker.text(prompt_tokens) for _ in range(num_prompts)]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="serve_config.yaml", help="our Serve config (serve run CONFIG)")
    parser.add_argument("--peer-dir", default=None, help="the peer's folder (default $PEER_DIR, else .peers/vllm_cpu)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-user", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--ours-url", default="http://127.0.0.1:8000")
    parser.add_argument("--running", action="store_true",
                        help="measure only the server already answering at --ours-url (start none; e.g. to profile it)")
    parser.add_argument("--peer-port", type=int, default=8300)
    parser.add_argument("--peer-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="vLLM's dtype (float32: its fast path on a CPU without AVX512-BF16, as ours picks)")
    parser.add_argument("--only", choices=("ours", "vllm"), default=None)
    parser.add_argument("--interleave", action="store_true",
                        help="both servers up at once, measured level by level in turn (robust to a drifting VM)")
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds a server may take to answer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the levels here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    prompts = make_prompts(64, args.prompt_tokens, args.seed)
    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    print(f"CPU flags: {cpu_flags()}; {os.cpu_count()} cores; load avg at start {load_average()}", flush=True)

    def measure_at(url: str):
        return lambda: measure(url, prompts, args.concurrency, args.requests_per_user, args.output_tokens)

    results: dict[str, tuple[float, list[Level]]] = {}
    peer_url = f"http://127.0.0.1:{args.peer_port}"

    def peer() -> tuple[list[str], dict[str, str]]:
        folder = find_peer_dir(args.peer_dir)
        if folder is None:
            raise SystemExit(f"vLLM peer not set up: {setup_hint()}")
        return peer_command(folder, args.peer_port, args.peer_dtype)

    if args.interleave and not args.running and args.only is None:
        with contextlib.ExitStack() as stack:
            started = {"ours": stack.enter_context(serving(*ours_command(args.config), args.ours_url,
                                                           logs / "bench-serve-ours.log", args.start_timeout)),
                       "vllm": stack.enter_context(serving(*peer(), peer_url, logs / "bench-serve-vllm.log",
                                                           args.start_timeout))}
            levels: dict[str, list[Level]] = {"ours": [], "vllm": []}
            for concurrency in args.concurrency:
                for name, url in (("ours", args.ours_url), ("vllm", peer_url)):
                    levels[name] += measure(url, prompts, [concurrency], args.requests_per_user, args.output_tokens)
            results = {name: (started[name], levels[name]) for name in started}
    elif args.running:
        results["ours"] = (0.0, measure_at(args.ours_url)())
    else:
        if args.only in (None, "ours"):
            command, env = ours_command(args.config)
            results["ours"] = run_server(command, env, args.ours_url, logs / "bench-serve-ours.log",
                                         measure_at(args.ours_url), args.start_timeout)
        if args.only in (None, "vllm"):
            command, env = peer()
            try:
                results["vllm"] = run_server(command, env, peer_url, logs / "bench-serve-vllm.log",
                                             measure_at(peer_url), args.start_timeout)
            except (RuntimeError, TimeoutError) as error:  # still print ours
                print(f"vLLM peer failed: {error} (log: {logs / 'bench-serve-vllm.log'})", file=sys.stderr)
    for name, (start_s, levels) in results.items():
        print(f"\n{name}: healthy {start_s:.1f} s after start\n{single_table(name, levels)}")
    if len(results) == 2:
        print(f"\nours ({args.config}) vs vLLM-CPU (loadtest/peers/vllm_cpu/serve.sh), {args.prompt_tokens}-token "
              f"prompts, {args.output_tokens} output tokens, greedy; CPU flags: {cpu_flags()}\n"
              + ratio_table(results["ours"][1], results["vllm"][1]))
    if results:
        print("\nfirst tokens by each server's own metrics (request_queue_time / request_prefill_time histograms):\n"
              + split_table({name: levels for name, (_, levels) in results.items()}))
    if args.json:
        Path(args.json).write_text(json.dumps({name: {"start_s": start, "levels": [vars(x) for x in levels]}
                                               for name, (start, levels) in results.items()}, indent=2))


if __name__ == "__main__":
    main()
