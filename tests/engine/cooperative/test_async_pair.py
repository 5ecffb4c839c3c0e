"""KunServe across two processes as served replicas run it: each replica's AsyncEngine loop is driven by its
side of the pair (`AsyncEngine.cooperate`), and each replica's clients keep streaming from it. Greedy tokens
equal transformers' (fp32) for streams from before the drop to after the restore (across a grown drop), their KV
copied across the forming and the restore, and wholly while dropped, on both replicas."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from engine.api import GenerateRequest
from engine.async_engine import AsyncEngine
from engine.cooperative.carry import CarryPolicy
from engine.cooperative.remote import RemoteLeader
from tests.engine.cooperative.pair_process import consume, engine_for, greedy, host_store, join, run_async_follower
from tests.engine.reference import hf_greedy, hf_model_from_source

DROP = (3, 1)  # layers 1 and 2 on both; the pair then grows to (2, 2)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_dir, prompts):
    return hf_greedy(hf_model_from_source(str(tiny_qwen3_dir)), prompts[:4], 64)


@pytest.mark.slow  # CI time (9 s): the pair keeps its exactness tests in test_pair.py / test_remote_pair.py
def test_served_replicas_stream_through_the_pair_exactly(tiny_qwen3_dir, prompts, reference):
    store = host_store()
    process = multiprocessing.get_context("spawn").Process(
        target=run_async_follower, args=(tiny_qwen3_dir, store.port, prompts, DROP), daemon=True)
    process.start()

    async def main() -> tuple[dict, dict]:
        channel = await asyncio.to_thread(join, store.port, 0, store)
        engine = AsyncEngine(engine_for(tiny_qwen3_dir))
        await engine.start()
        tokens: dict = {}
        first = asyncio.Event()
        a = asyncio.ensure_future(consume(engine.generate(GenerateRequest("a", tuple(prompts[0]), greedy(64))),
                                          tokens, "a", first))
        await first.wait()
        leader = RemoteLeader(engine.engine, channel, min_micro_batch_tokens=8, carry=CarryPolicy("copy"))
        assert await engine.cooperate(leader, lambda: leader.form(*DROP)) > 0
        assert engine.stats().drop_state == "dropped"
        await consume(engine.generate(GenerateRequest("d", tuple(prompts[3]), greedy(8))), tokens, "d")
        # the plan's grow: the follower drops layer 1 and offers its chunks (the shadow's KV gets them), the
        # leader drops layer 2; the cut stays, no KV moves, and the streams go on
        def grow(llm):
            offered = leader._shadow.num_available_chunks()
            return leader.grow(2, 2), leader._shadow.num_available_chunks() - offered, llm.dropped_weight_bytes

        grown, offered, dropped = await engine.run_in_engine(grow)
        arena = engine.engine.rank.arena
        assert grown == offered == arena.layer_chunks([2]) > 0
        assert dropped == arena.layer_chunks([2, 3]) * engine.engine.pool.chunk_bytes
        for _ in range(3000):  # until the follower's "c" (8 tokens, wholly while dropped) ended
            finished, peers = await engine.run_in_engine(
                lambda _: (leader.num_peer_requests_finished, frozenset(leader.peer_requests)))
            if finished:
                break
            await asyncio.sleep(0.01)
        assert finished == 1 and peers == {"b"} and not a.done()  # both 64-token streams span the restore
        await engine.run_in_engine(lambda _: leader.restore())
        await a
        theirs = await asyncio.to_thread(channel.recv_object)
        assert engine.driver is None and engine.stats().drop_state == "normal"
        assert leader.stats.num_steps > 0 and 0 < leader.bubble_ratio < 1
        # "a" and "b" kept their KV across the forming and "a" across the restore (copied, never recomputed)
        assert (leader.num_carried, leader.num_recomputed) == (3, 0)
        await engine.shutdown()
        return tokens, theirs

    tokens, theirs = asyncio.run(main())
    process.join(timeout=30)
    assert process.exitcode == 0
    assert tokens["a"] == reference[0] and tokens["d"] == reference[3][:8]
    assert theirs["tokens"]["b"] == reference[1] and theirs["tokens"]["c"] == reference[2][:8]
    assert theirs["steps"] > 0 and "errors" not in tokens and "errors" not in theirs["tokens"]
    assert (theirs["carried"], theirs["recomputed"]) == (1, 0)  # "b" came back with layers [0, 2) copied
