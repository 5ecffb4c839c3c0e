"""`python -m loadtest.bench.kunserve_bubble`: a cross-process KunServe pair's decode steps with the step run
whole (one micro-batch: the stages run one after the other) against the step cut into two micro-batches by
rows (`MicroBatchCut.min_decode_rows`: the follower runs stage 2 of the first while the leader runs stage 1 of
the second), side by side in one run.

Two processes (this one the leader, a spawned one the follower), each an engine of the embedded SmolLM2
(`--dtype`, one torch thread each) with `--requests` greedy requests of `--prompt-tokens` tokens; once all
decode, the pair forms (half the layers each, KV copied) and serves every request. Then `--rounds` rounds of
`--steps` steps whole, then `--steps` steps cut (ABAB, so a change in the box's load hits both alike); per
mode: ms per step (mean and median) and the bubble ratio of those steps (the leader's `PipelineStats`:
1 - (busy stage 1 + busy stage 2) / (2 x wall)).
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time

import torch.distributed as dist

from engine.cooperative.carry import CarryPolicy
from engine.cooperative.channel import PairChannel
from engine.cooperative.follower import RemoteFollower
from engine.cooperative.pipeline import MicroBatchCut, PipelineStats
from engine.cooperative.remote import RemoteLeader
from loadtest.bench.kunserve_carry import TIMEOUT, add_requests, channel_for, collect, make_engine, until_all_decoding


def run_follower(port: int, dtype: str, count: int, prompt_tokens: int, max_tokens: int) -> None:
    channel = channel_for(port, PairChannel.FOLLOWER)
    engine = make_engine(dtype)
    tokens: dict = {}
    add_requests(engine, "f", count, prompt_tokens, max_tokens)
    until_all_decoding(engine, tokens)
    channel.send_object("ready")
    follower = RemoteFollower(engine, channel, CarryPolicy("copy"))
    follower.form(*channel.recv_object())
    while follower.is_formed:
        collect(tokens, follower.serve_one())
    while engine.has_work:
        collect(tokens, engine.step())
    channel.send_object("done")
    channel.flush()
    engine.close()


def delta(after: PipelineStats, before: PipelineStats) -> PipelineStats:
    return PipelineStats(after.num_steps - before.num_steps, after.num_micro_batches - before.num_micro_batches,
                         after.wall_s - before.wall_s,
                         (after.busy_s[0] - before.busy_s[0], after.busy_s[1] - before.busy_s[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=8, help="decoding requests on each replica")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="steps per mode per round")
    parser.add_argument("--min-decode-rows", type=int, default=1, help="the cut mode's MicroBatchCut")
    args = parser.parse_args()
    max_tokens = 2 * args.rounds * args.steps + 8 + args.prompt_tokens // 64  # room for recompute steps
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=TIMEOUT, wait_for_workers=False)
    process = multiprocessing.get_context("spawn").Process(
        target=run_follower, args=(store.port, args.dtype, args.requests, args.prompt_tokens, max_tokens),
        daemon=True)
    process.start()
    channel = channel_for(store.port, PairChannel.LEADER, store)
    engine = make_engine(args.dtype)
    tokens: dict = {}
    add_requests(engine, "l", args.requests, args.prompt_tokens, max_tokens)
    until_all_decoding(engine, tokens)
    channel.recv_object()  # the follower is ready too
    half = engine.model_config.num_layers // 2
    leader = RemoteLeader(engine, channel, carry=CarryPolicy("copy"))
    channel.send_object((half, half))
    leader.form(half, half)
    carried, recomputed = leader.num_carried, leader.num_recomputed
    collect(tokens, leader.step())
    # warm-up, and until no request prefills (those whose KV did not fit to copy recompute it)
    while any(request.is_prefilling for request in engine.scheduler.requests.values()):
        collect(tokens, leader.step())
    modes = {"whole": MicroBatchCut(), f"cut >= {args.min_decode_rows} rows": MicroBatchCut(
        min_decode_rows=args.min_decode_rows)}
    times: dict[str, list[float]] = {name: [] for name in modes}
    stats = {name: PipelineStats() for name in modes}
    rows, prefill_steps = set(), 0
    for _ in range(args.rounds):
        for name, cut in modes.items():
            leader._runner.cut = cut
            before = PipelineStats()
            before.add(leader._runner.stats)
            for _ in range(args.steps):
                rows.add(len(engine.scheduler.running))
                prefill_steps += any(request.is_prefilling for request in engine.scheduler.requests.values())
                started = time.perf_counter()
                collect(tokens, leader.step())
                times[name].append(time.perf_counter() - started)
            stats[name].add(delta(leader._runner.stats, before))
    leader.restore()
    while engine.has_work:
        collect(tokens, engine.step())
    channel.recv_object()
    process.join(timeout=60)
    engine.close()
    whole = statistics.mean(times["whole"])
    print(f"cross-process pair, {args.dtype}, {args.requests} + {args.requests} requests of {args.prompt_tokens} "
          f"prompt tokens (running per step {sorted(rows)}; {prefill_steps} steps had a prefill; carried at forming "
          f"{carried}, recomputed {recomputed}"
          f"), {args.rounds} rounds x {args.steps} steps per mode")
    print(f"{'mode':>16}  {'micro-batches/step':>18}  {'ms/step mean':>12}  {'median':>7}  {'x whole':>7}  "
          f"{'bubble':>6}  {'busy stage 1 / 2 ms/step':>24}")
    for name in modes:
        s, mean = stats[name], statistics.mean(times[name])
        print(f"{name:>16}  {s.num_micro_batches / s.num_steps:>18.2f}  {mean * 1e3:>12.1f}  "
              f"{statistics.median(times[name]) * 1e3:>7.1f}  {whole / mean:>6.2f}x  {s.bubble_ratio:>6.2f}  "
              f"{s.busy_s[0] / s.num_steps * 1e3:>11.1f} / {s.busy_s[1] / s.num_steps * 1e3:<11.1f}", flush=True)


if __name__ == "__main__":
    main()
