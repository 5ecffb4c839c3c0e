"""The other process of a cross-process cooperative pair in tests: joins a two-rank gloo group and plays
the follower (stage 2) or the leader (stage 1) of engine/cooperative/, driven by a fixed script."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal

import torch.distributed as dist

from engine.api import GenerateRequest
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.cooperative.carry import CarryPolicy
from engine.cooperative.channel import PairChannel, loopback_pair
from engine.cooperative.follower import RemoteFollower
from engine.cooperative.remote import RemoteLeader
from engine.core.engine import LLMEngine
from engine.text.tokenizer import load_tokenizer
from engine.weights import resolve_model_source
from tests.engine.engine_helpers import greedy

TIMEOUT_S = 60  # a loaded shared box: spawning the peer and its first steps can take long


def pair_config(model_dir, **overrides) -> EngineConfig:
    base = dict(model=str(model_dir), dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=8,
                max_num_batched_tokens=32, tokens_per_page=16, device_memory_bytes=64 << 20,
                host_buffer_bytes=4 << 20, enable_parameter_dropping=True)
    base.update(overrides)
    return EngineConfig(**base)


def host_store() -> dist.TCPStore:
    """The test process hosts the group's store (whichever rank it plays)."""
    return dist.TCPStore("127.0.0.1", 0, 2, True, timeout=datetime.timedelta(seconds=TIMEOUT_S),
                         wait_for_workers=False)


def join(port: int, rank: int, store: dist.TCPStore | None = None, hang_after_s: float | None = None) -> PairChannel:
    """`hang_after_s`: watch the peer with a heartbeat (engine/cooperative/heartbeat.py) through a store client
    of its own."""
    timeout = datetime.timedelta(seconds=TIMEOUT_S)
    channel = loopback_pair(port, rank, timeout, store)
    if hang_after_s is not None:
        channel.watch(dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout), hang_after_s=hang_after_s)
    return channel


def engine_for(model_dir, kv_layout: str = "contiguous") -> LLMEngine:
    return LLMEngine(pair_config(model_dir, kv_layout=kv_layout), tokenizer=load_tokenizer(resolve_model_source(None)))


def add(engine_or_side, request_id: str, prompt, max_tokens: int) -> None:
    request = GenerateRequest(request_id, tuple(prompt), greedy(max_tokens))
    if isinstance(engine_or_side, RemoteFollower):
        engine_or_side.submit(request)
    else:
        engine_or_side.add_request(request)


def collect(tokens: dict, outputs) -> None:
    for output in outputs:
        tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        if output.finish_reason == "error":
            tokens.setdefault("errors", []).append((output.request_id, output.error))


def run_follower(model_dir, port: int, prompts, drop: tuple[int, int], die_after_syncs: int | None = None,
                 carry: str = "auto", hang_after_s: float | None = None, kv_layout: str = "contiguous",
                 die_at_restore: bool = False, results=None) -> None:
    """Serves "b" alone for 4 steps, forms the pair, submits "c" (8 tokens, wholly while dropped) and "f"
    (24 tokens, spans the restore), serves until restored, finishes alone, sends its tokens to rank 0.
    `die_after_syncs`: exits abruptly after that many syncs instead (a replica dying while dropped);
    `carry`: the CarryPolicy mode for its requests' KV; `hang_after_s`: watch the leader with a heartbeat;
    `die_at_restore`: exits abruptly on the leader's restore message, before answering it; `results`: a
    queue that also gets its summary (the channel may be gone by then)."""
    channel = join(port, 1, hang_after_s=hang_after_s)
    engine = engine_for(model_dir, kv_layout)
    follower = RemoteFollower(engine, channel, CarryPolicy(carry))
    if die_at_restore:
        follower._restore = lambda *args: os._exit(0)
    tokens: dict = {}
    add(engine, "b", prompts[1], 24)
    for _ in range(4):
        collect(tokens, engine.step())
    follower.form(*drop)
    add(follower, "c", prompts[2], 8)
    add(follower, "f", prompts[5], 24)
    num_syncs = 0
    while follower.is_formed:
        collect(tokens, follower.serve_one())
        num_syncs += follower.num_steps > 0
        if die_after_syncs is not None and follower.num_steps >= die_after_syncs:
            os._exit(0)
    while engine.has_work:
        collect(tokens, engine.step())
    if results is not None:
        results.put({"tokens": tokens, "dropped": engine.dropped_weight_bytes, "state": engine.drop_state})
    channel.send_object({"tokens": tokens, "weights": engine.pool.num_held("weights"),
                         "dropped": engine.dropped_weight_bytes, "kv_used": engine.kv.num_used_chunks(),
                         "steps": follower.num_steps, "carried": follower.num_carried,
                         "recomputed": follower.num_recomputed})
    channel.flush()


def run_leader_then_die(model_dir, port: int | None, prompts, drop: tuple[int, int], steps: int,
                        mid_step: bool = False, hang: bool = False, ports=None, at_restore: bool = False) -> None:
    """Forms the pair as the leader, runs `steps` steps, then exits abruptly (the leader dying while dropped);
    `mid_step`: in the middle of the next step, once the follower has its plan and waits for hidden states.
    `hang`: stops itself (SIGSTOP) instead of exiting: alive, its sockets open, answering nothing. `port`
    None: it hosts the group's store (as a Serve leader does) and puts the port in `ports`. `at_restore`: after
    the steps it restores, and exits just after sending the restore message (before any KV)."""
    store = None
    if port is None:
        store = host_store()
        port = store.port
        ports.put(port)
    channel = join(port, 0, store, hang_after_s=2.0 if hang else None)

    def die() -> None:
        if hang:
            os.kill(os.getpid(), signal.SIGSTOP)  # the test kills it
        os._exit(0)

    leader = RemoteLeader(engine_for(model_dir), channel, min_micro_batch_tokens=8)
    leader.form(*drop)
    for _ in range(steps):
        leader.step()
    if mid_step:
        send_object = channel.send_object

        def send_then_die_at_the_hidden_states(message) -> None:
            send_object(message)
            if message[0] == "step":
                channel.send_tensor = lambda *args, **kwargs: die()

        channel.send_object = send_then_die_at_the_hidden_states
        leader.step()
    if at_restore:
        send = channel.send_object

        def send_then_die_at_the_restore(message) -> None:
            send(message)
            if message[0] == "restore":
                channel.flush()
                die()

        channel.send_object = send_then_die_at_the_restore
        leader.restore()
    die()


async def consume(stream, tokens: dict, request_id: str, first: asyncio.Event | None = None) -> None:
    async for output in stream:
        tokens.setdefault(request_id, []).extend(output.new_token_ids)
        if output.finish_reason == "error":
            tokens.setdefault("errors", []).append((request_id, output.error))
        if first is not None:
            first.set()


def run_async_follower(model_dir, port: int, prompts, drop: tuple[int, int]) -> None:
    """The follower as a served replica runs it: an AsyncEngine whose clients stream "b" (64 tokens: from
    before the drop to after the restore) and "c" (8 tokens, wholly while dropped) from it."""

    async def main() -> dict:
        channel = join(port, 1)
        engine = AsyncEngine(engine_for(model_dir))
        await engine.start()
        tokens: dict = {}
        first = asyncio.Event()
        b = asyncio.ensure_future(consume(engine.generate(GenerateRequest("b", tuple(prompts[1]), greedy(64))),
                                          tokens, "b", first))
        await first.wait()
        follower = RemoteFollower(engine.engine, channel, CarryPolicy("copy"))
        await engine.cooperate(follower, lambda: follower.form(*drop))
        await consume(engine.generate(GenerateRequest("c", tuple(prompts[2]), greedy(8))), tokens, "c")
        await b
        while engine.driver is not None:
            await asyncio.sleep(0.01)
        await engine.shutdown()
        channel.send_object({"tokens": tokens, "steps": follower.num_steps, "carried": follower.num_carried,
                             "recomputed": follower.num_recomputed})
        channel.flush()
        return tokens

    asyncio.run(main())
