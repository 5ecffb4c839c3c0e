"""`python -m loadtest.bench.kunserve_carry`: the stall of forming and dissolving a cross-process KunServe pair
when the requests in flight keep their KV (copied over the pair's gloo group) vs recompute it.

Two processes (this one the leader, a spawned one the follower), each an engine of the embedded SmolLM2
(`--dtype`, one torch thread each) with `--requests` greedy requests of `--prompt-tokens` tokens, all
decoding when the pair forms. Per carry mode (`copy`, `recompute`; `auto` chooses by cost and is reported):

- form: from `form()` on both sides until every request of both replicas produced its next token on the
  pipeline (the copy moves layers [0, split) of the follower's requests and [split, L) of the leader's;
  recompute prefills every request again);
- restore: from `restore()` until every request of the leader produced its next token alone (the follower's
  are timed there the same way and reported back).

Every run's tokens are checked equal to the first run's. One process pair per mode, the same workload.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import time

import torch.distributed as dist

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.cooperative.carry import CarryPolicy
from engine.cooperative.channel import PairChannel, loopback_pair
from engine.cooperative.follower import RemoteFollower
from engine.cooperative.remote import RemoteLeader
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams

TIMEOUT = datetime.timedelta(seconds=300)
TEXT = "Once upon a time, in a small village by the sea, there lived an old fisherman who "


def make_engine(dtype: str) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=dtype, num_threads=1, max_model_len=2048, max_num_seqs=32,
                                  max_num_batched_tokens=512, device_memory_bytes=2 << 30,
                                  host_buffer_bytes=16 << 20, enable_parameter_dropping=True))


def channel_for(port: int, rank: int, store=None) -> PairChannel:
    return loopback_pair(port, rank, TIMEOUT, store)


def add_requests(engine: LLMEngine, prefix: str, count: int, prompt_tokens: int, max_tokens: int) -> None:
    for index in range(count):
        ids = engine.tokenizer(f"{prefix}{index}: " + TEXT * (prompt_tokens // 16)).input_ids[:prompt_tokens]
        engine.add_request(GenerateRequest(f"{prefix}{index}", tuple(ids),
                                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))


def collect(tokens: dict, outputs) -> set[str]:
    produced = set()
    for output in outputs:
        tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        if output.new_token_ids:
            produced.add(output.request_id)
    return produced


def until_all_decoding(engine: LLMEngine, tokens: dict) -> None:
    while any(request.request_id not in tokens for request in engine.scheduler.requests.values()):
        collect(tokens, engine.step())


def until_next_token(engine: LLMEngine, step) -> None:
    """Steps until every request the scheduler holds now has produced one more token (or finished)."""
    counts = {rid: len(request.output_token_ids) for rid, request in engine.scheduler.requests.items()}
    while any(rid in engine.scheduler.requests and len(engine.scheduler.requests[rid].output_token_ids) <= count
              for rid, count in counts.items()):
        step()


def run_follower(port: int, mode: str, dtype: str, count: int, prompt_tokens: int, max_tokens: int) -> None:
    channel = channel_for(port, PairChannel.FOLLOWER)
    engine = make_engine(dtype)
    tokens: dict = {}
    add_requests(engine, "f", count, prompt_tokens, max_tokens)
    until_all_decoding(engine, tokens)
    channel.send_object("ready")
    channel.recv_object()  # "go"
    follower = RemoteFollower(engine, channel, CarryPolicy(mode))
    follower.form(*channel.recv_object())
    while follower.is_formed:
        collect(tokens, follower.serve_one())
    started = time.perf_counter()
    until_next_token(engine, lambda: collect(tokens, engine.step()))
    stall = time.perf_counter() - started  # from the restore's end here (its copy is in the leader's time)
    while engine.has_work:
        collect(tokens, engine.step())
    channel.send_object({"tokens": tokens, "restore_s": stall, "carried": follower.num_carried,
                         "recomputed": follower.num_recomputed})
    channel.flush()
    engine.close()


def run_mode(mode: str, args) -> dict:
    store = dist.TCPStore("127.0.0.1", 0, 2, True, timeout=TIMEOUT, wait_for_workers=False)
    process = multiprocessing.get_context("spawn").Process(
        target=run_follower, args=(store.port, mode, args.dtype, args.requests, args.prompt_tokens, args.tokens),
        daemon=True)
    process.start()
    channel = channel_for(store.port, PairChannel.LEADER, store)
    engine = make_engine(args.dtype)
    tokens: dict = {}
    add_requests(engine, "l", args.requests, args.prompt_tokens, args.tokens)
    until_all_decoding(engine, tokens)
    channel.recv_object()  # the follower is ready too
    half = engine.model_config.num_layers // 2
    leader = RemoteLeader(engine, channel, carry=CarryPolicy(mode))
    channel.send_object("go")
    channel.send_object((half, half))
    started = time.perf_counter()
    leader.form(half, half)
    formed = time.perf_counter() - started
    until_next_token(engine, lambda: collect(tokens, leader.step()))  # both replicas' requests are here now
    form_s = time.perf_counter() - started
    carried, recomputed = leader.num_carried, leader.num_recomputed
    started = time.perf_counter()
    leader.restore()
    restored = time.perf_counter() - started
    until_next_token(engine, lambda: collect(tokens, leader.step()))
    restore_s = time.perf_counter() - started
    while engine.has_work:
        collect(tokens, leader.step())
    theirs = channel.recv_object()
    process.join(timeout=60)
    engine.close()
    return {"form_call_s": formed, "form_s": form_s, "restore_call_s": restored, "restore_s": restore_s,
            "follower_restore_s": theirs["restore_s"], "carried": (carried, leader.num_carried - carried,
                                                                    theirs["carried"]),
            "recomputed": (recomputed, leader.num_recomputed - recomputed, theirs["recomputed"]),
            "tokens": {**tokens, **theirs["tokens"]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=8, help="decoding requests on each replica")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=24, help="tokens each request generates")
    parser.add_argument("--modes", default="copy,recompute,auto")
    args = parser.parse_args()
    first_tokens = None
    for mode in args.modes.split(","):
        result = run_mode(mode, args)
        same = first_tokens is None or result["tokens"] == first_tokens
        first_tokens = first_tokens or result["tokens"]
        print(f"{mode:>9}: form {result['form_call_s'] * 1e3:.0f} ms (call), {result['form_s'] * 1e3:.0f} ms until "
              f"every request's next token; restore {result['restore_call_s'] * 1e3:.0f} ms (call), "
              f"{result['restore_s'] * 1e3:.0f} ms until the leader's next tokens, follower's "
              f"{result['follower_restore_s'] * 1e3:.0f} ms after; carried (form, restore leader, restore follower) "
              f"{result['carried']}, recomputed {result['recomputed']}; "
              f"{'same tokens' if same else 'TOKENS DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
