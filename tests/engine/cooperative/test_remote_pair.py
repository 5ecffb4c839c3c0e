"""KunServe across two processes: the leader (this test process) runs stage 1 and the pair's scheduler,
the follower (a spawned process) runs stage 2; hidden states go over a two-rank gloo group, the
follower's KV layout replays the leader's log with a layer mask. Greedy tokens equal transformers' (fp32)
for requests that span the drop, run wholly while dropped (from either replica's clients) and span the
restore; a replica dying while dropped leaves its peer serving alone from its host copy."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from engine.cooperative.carry import CarryPolicy
from engine.cooperative.follower import LEADER_ERROR, RemoteFollower
from engine.cooperative.remote import RemoteLeader
from tests.engine.cooperative.pair_process import (
    TIMEOUT_S,
    add,
    collect,
    engine_for,
    host_store,
    join,
    run_follower,
    run_leader_then_die,
)
from tests.engine.cooperative.test_pair import assert_pool_exact
from tests.engine.engine_helpers import assert_pool_idle
from tests.engine.reference import hf_greedy, hf_model_from_source

DROP = (2, 2)  # the tiny model has 4 layers: the leader keeps [0, 2), the follower [2, 4)


@pytest.fixture(scope="module")
def reference(tiny_qwen3_dir, prompts):
    return hf_greedy(hf_model_from_source(str(tiny_qwen3_dir)), prompts, 24)


def spawn(target, *args) -> multiprocessing.Process:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def assert_same(tokens: dict, reference, index: int, request_id: str, count: int) -> None:
    assert tokens[request_id] == reference[index][:count], request_id


@pytest.mark.slow  # about 10-15 s each; the default suite runs the served path (test_async_pair.py)
@pytest.mark.parametrize(("carry", "kv_layout", "min_decode_rows"), [
    ("copy", "contiguous", 0), ("recompute", "contiguous", 0), ("copy", "paged", 0), ("copy", "contiguous", 1)])
def test_two_processes_serve_as_one_pipeline_exactly(tiny_qwen3_dir, prompts, reference, carry, kv_layout,
                                                     min_decode_rows):
    """Requests in flight when the pair forms ("a" here, "b" there) and when it restores ("e" here, "f"
    there) keep their KV over the channel (copy) or recompute it; either way the tokens are transformers'.
    On either KV layout (the follower replays the leader's log into its own), and with decode steps cut into
    micro-batches of >= 1 row (`min_decode_rows`: the follower runs the first while the leader runs the next)."""
    store = host_store()
    process = spawn(run_follower, tiny_qwen3_dir, store.port, prompts, DROP, None, carry, None, kv_layout)
    channel = join(store.port, 0, store)
    engine = engine_for(tiny_qwen3_dir, kv_layout)
    leader = RemoteLeader(engine, channel, min_micro_batch_tokens=8, carry=CarryPolicy(carry),
                          min_decode_rows=min_decode_rows)
    tokens: dict = {}
    add(engine, "a", prompts[0], 8)  # spans the drop, ends while dropped
    for _ in range(4):
        collect(tokens, engine.step())
    weights = engine.pool.num_held("weights")
    freed = leader.form(*DROP)
    assert freed == engine.rank.arena.layer_chunks([2, 3]) > 0
    assert engine.pool.num_held("weights") == weights - freed and engine.drop_state == "dropped"
    # "a" and the follower's "b" were running: placed with their KV (copy), or waiting to recompute
    assert (leader.num_carried, leader.num_recomputed) == ((2, 0) if carry == "copy" else (0, 1))
    assert_pool_exact(engine)
    add(engine, "d", prompts[3], 8)  # wholly while dropped
    add(engine, "e", prompts[4], 24)  # spans the restore
    seen_peer = set()
    for _ in range(200):
        collect(tokens, leader.step())
        seen_peer |= leader.peer_requests
        if {"a", "d"} <= tokens.keys() and len(tokens["d"]) == 8 and {"c", "f"} <= seen_peer \
                and "c" not in leader.peer_requests:
            break
    stats = leader._runner.stats
    assert leader.bubble_ratio > 0 and stats.num_steps > 0
    if min_decode_rows:  # every step with 2+ decoding requests ran as two micro-batches
        assert stats.num_micro_batches >= 2 * stats.num_steps - 2
    assert "f" in leader.peer_requests and len(tokens["e"]) < 24  # both still running: they span the restore
    running = {request.request_id for request in engine.scheduler.running}
    assert {"e", "f"} <= running  # both carried across the restore (with whichever others still run)
    back = running & leader.peer_requests
    assert leader.restore() == freed
    assert engine.pool.num_held("weights") == weights and engine.drop_state == "normal"
    assert_pool_exact(engine)
    if carry == "copy":  # "e" came back with layers [2, 4) from the follower, "f" went to it with [0, 2)
        assert leader.num_recomputed == 0 and leader.num_carried == 2 + len(running - back)
        assert engine.scheduler.requests["e"].num_computed_tokens > 0
    else:
        assert leader.num_carried == 0 and leader.num_recomputed == 1 + len(running)
    while engine.has_work:
        collect(tokens, leader.step())
    theirs = channel.recv_object()
    process.join(timeout=30)
    assert process.exitcode == 0
    for request_id, index, count in (("a", 0, 8), ("d", 3, 8), ("e", 4, 24)):
        assert_same(tokens, reference, index, request_id, count)
    for request_id, index, count in (("b", 1, 24), ("c", 2, 8), ("f", 5, 24)):
        assert_same(theirs["tokens"], reference, index, request_id, count)
    assert "errors" not in tokens and "errors" not in theirs["tokens"]
    assert theirs["dropped"] == 0 and theirs["kv_used"] == 0 and theirs["steps"] > 0
    # the follower's side: "f" (and any other of its requests still running) placed with their KV on restoring;
    # "b" recomputing from forming on
    assert (theirs["carried"], theirs["recomputed"]) == ((len(back), 0) if carry == "copy" else (0, 1))
    assert_pool_idle(engine)
    engine.close()


@pytest.mark.slow  # about 12 s: a second spawned process (the fast path is the test above)
def test_follower_dying_while_dropped_leaves_the_leader_serving(tiny_qwen3_dir, prompts, reference):
    store = host_store()
    process = spawn(run_follower, tiny_qwen3_dir, store.port, prompts, DROP, 3)
    channel = join(store.port, 0, store)
    engine = engine_for(tiny_qwen3_dir)
    leader = RemoteLeader(engine, channel, min_micro_batch_tokens=8)
    tokens: dict = {}
    add(engine, "a", prompts[0], 24)
    freed = leader.form(*DROP)
    for _ in range(50):
        collect(tokens, leader.step())
        if not leader.is_formed:
            break
    assert not leader.is_formed and engine.dropped_weight_bytes == 0 and engine.drop_state == "normal"
    assert leader.num_peer_requests_ended >= 1 and freed > 0  # the follower's "b" (and what it sent) went with it
    while engine.has_work:
        collect(tokens, leader.step())
    assert_same(tokens, reference, 0, "a", 24)
    assert_pool_idle(engine)
    process.join(timeout=30)
    engine.close()


@pytest.mark.slow  # about 12 s
def test_follower_dying_during_the_restore_leaves_the_leader_serving(tiny_qwen3_dir, prompts, reference):
    """The follower exits on the restore message, before sending back the leader's requests' layers
    [split, L): the leader still restores, its own requests recompute that KV and finish exactly."""
    store = host_store()
    process = spawn(run_follower, tiny_qwen3_dir, store.port, prompts, DROP, None, "copy", None, "contiguous", True)
    channel = join(store.port, 0, store)
    engine = engine_for(tiny_qwen3_dir)
    leader = RemoteLeader(engine, channel, min_micro_batch_tokens=8, carry=CarryPolicy("copy"))
    tokens: dict = {}
    add(engine, "a", prompts[0], 24)
    freed = leader.form(*DROP)
    for _ in range(4):
        collect(tokens, leader.step())
    assert len(tokens["a"]) < 24
    assert leader.restore() == freed
    assert not leader.is_formed and engine.dropped_weight_bytes == 0 and engine.drop_state == "normal"
    assert leader.num_peer_requests_ended >= 1  # the follower's "b" (and what it sent) went with it
    assert engine.scheduler.requests["a"].num_computed_tokens == 0  # its copy never came: it recomputes
    while engine.has_work:
        collect(tokens, leader.step())
    assert_same(tokens, reference, 0, "a", 24)
    assert_pool_idle(engine)
    process.join(timeout=30)
    engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
def test_leader_dying_while_dropped_ends_the_followers_requests_with_an_error(tiny_qwen3_dir, prompts, reference,
                                                                            mid_step):
    store = host_store()
    process = spawn(run_leader_then_die, tiny_qwen3_dir, store.port, prompts, DROP, 3, mid_step)
    channel = join(store.port, 1, store)
    engine = engine_for(tiny_qwen3_dir)
    follower = RemoteFollower(engine, channel)
    add(engine, "b", prompts[1], 24)
    follower.form(*DROP)
    tokens: dict = {}
    started = time.monotonic()
    for _ in range(100):
        collect(tokens, follower.serve_one())
        if not follower.is_formed:
            break
    # a dead process closes its sockets: the group fails at once, long before its timeout
    assert time.monotonic() - started < TIMEOUT_S / 4
    assert not follower.is_formed and engine.dropped_weight_bytes == 0
    assert tokens["errors"] == [("b", LEADER_ERROR)]
    add(follower, "g", prompts[6], 8)  # the survivor serves alone again
    while engine.has_work:
        collect(tokens, engine.step())
    assert_same(tokens, reference, 6, "g", 8)
    assert_pool_idle(engine)
    process.join(timeout=30)
    engine.close()


@pytest.mark.slow  # about 12 s
def test_leader_dying_during_the_restore_leaves_the_followers_requests_recomputing(tiny_qwen3_dir, prompts,
                                                                                  reference):
    """The leader exits right after its restore message (the follower's requests as snapshots, their KV to
    follow): the follower restores and its request recomputes and finishes exactly, no error."""
    store = host_store()
    process = spawn(run_leader_then_die, tiny_qwen3_dir, store.port, prompts, DROP, 3, False, False, None, True)
    channel = join(store.port, 1, store)
    engine = engine_for(tiny_qwen3_dir)
    follower = RemoteFollower(engine, channel, CarryPolicy("copy"))
    add(engine, "b", prompts[1], 24)
    follower.form(*DROP)
    tokens: dict = {}
    while follower.is_formed:
        collect(tokens, follower.serve_one())
    assert engine.dropped_weight_bytes == 0 and engine.drop_state == "normal"
    assert "b" in engine.scheduler.requests and engine.scheduler.requests["b"].num_computed_tokens == 0
    while engine.has_work:
        collect(tokens, engine.step())
    assert "errors" not in tokens
    assert_same(tokens, reference, 1, "b", 24)
    assert_pool_idle(engine)
    process.join(timeout=30)
    engine.close()


HANG_S = 2.0  # the heartbeat's verdict; the group's own timeout is TIMEOUT_S (60 s)


@pytest.mark.slow  # about 15 s: a spawned follower that the test stops (SIGSTOP) while dropped
def test_a_hung_follower_is_noticed_by_its_heartbeat_and_the_leader_serves_alone(tiny_qwen3_dir, prompts, reference):
    store = host_store()
    results = multiprocessing.get_context("spawn").Queue()
    process = spawn(run_follower, tiny_qwen3_dir, store.port, prompts, DROP, None, "auto", HANG_S, "contiguous",
                    False, results)
    try:
        channel = join(store.port, 0, store, hang_after_s=HANG_S)
        engine = engine_for(tiny_qwen3_dir)
        leader = RemoteLeader(engine, channel, min_micro_batch_tokens=8)
        tokens: dict = {}
        add(engine, "a", prompts[0], 24)
        leader.form(*DROP)
        for _ in range(3):
            collect(tokens, leader.step())
        assert leader.is_formed and len(tokens.get("a", [])) < 24
        os.kill(process.pid, signal.SIGSTOP)  # alive, its sockets open, answering nothing
        stopped = time.monotonic()
        while leader.is_formed:
            collect(tokens, leader.step())
        noticed = time.monotonic() - stopped
        # the heartbeat, not the group's timeout: about HANG_S after the last beat
        assert HANG_S - 0.5 < noticed < HANG_S + 4, noticed
        assert channel.silent_for is not None and channel.silent_for > HANG_S
        assert engine.dropped_weight_bytes == 0 and engine.drop_state == "normal"
        assert leader.num_peer_requests_ended >= 1  # the follower's "b": its client is on the stopped replica
        while engine.has_work:
            collect(tokens, leader.step())
        assert_same(tokens, reference, 0, "a", 24)
        assert "errors" not in tokens
        assert_pool_idle(engine)
        engine.close()
        # the stopped follower resumes: its group is closed, it restores alone and its clients' requests (which
        # ran on the leader) end with the error event
        os.kill(process.pid, signal.SIGCONT)
        theirs = results.get(timeout=TIMEOUT_S)
        assert theirs["dropped"] == 0 and theirs["state"] == "normal"
        assert {request_id for request_id, error in theirs["tokens"]["errors"] if error == LEADER_ERROR} >= {"b"}
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)


@pytest.mark.slow  # about 15 s each
@pytest.mark.parametrize("mid_step", [False, True], ids=["between-steps", "mid-step"])
def test_a_hung_leader_is_noticed_by_its_heartbeat_and_the_follower_serves_alone(tiny_qwen3_dir, prompts, reference,
                                                                               mid_step):
    """The leader hosts the group's store (as in Serve) and stops itself after 3 steps: the follower's
    heartbeat calls to the store time out too. Its forwarded request ends with an error event."""
    ports = multiprocessing.get_context("spawn").Queue()
    process = spawn(run_leader_then_die, tiny_qwen3_dir, None, prompts, DROP, 3, mid_step, True, ports)
    try:
        channel = join(ports.get(timeout=TIMEOUT_S), 1, hang_after_s=HANG_S)
        engine = engine_for(tiny_qwen3_dir)
        follower = RemoteFollower(engine, channel)
        add(engine, "b", prompts[1], 24)
        follower.form(*DROP)
        tokens: dict = {}
        started = time.monotonic()
        while follower.is_formed:
            collect(tokens, follower.serve_one())
        # forming's exchange, 3 steps, then HANG_S of silence: far below the group's timeout
        assert time.monotonic() - started < HANG_S + 6 < TIMEOUT_S / 4
        assert channel.silent_for is not None and channel.silent_for > HANG_S
        assert _state(process.pid) == "T"  # it was hung, not dead
        assert engine.dropped_weight_bytes == 0 and engine.drop_state == "normal"
        assert tokens["errors"] == [("b", LEADER_ERROR)]
        add(follower, "g", prompts[6], 8)  # the survivor serves alone again
        while engine.has_work:
            collect(tokens, engine.step())
        assert_same(tokens, reference, 6, "g", 8)
        assert_pool_idle(engine)
        engine.close()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=30)


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_leader_told_the_follower_failed_raises_its_reason_and_changes_nothing(tiny_qwen3_dir):
    """Forming through Serve: the follower answers "failed" (with why) over the group when its side cannot form,
    and the leader, which received that off its engine thread, raises it before touching its engine."""
    engine = engine_for(tiny_qwen3_dir)
    try:
        chunks = engine.pool.telemetry().to_dict()
        leader = RemoteLeader(engine, channel=None)  # never used: the answer came already
        with pytest.raises(RuntimeError, match="PoolExhausted.*no room"):
            leader.form(*DROP, formed=("failed", "PoolExhausted('no room')", ()))
        assert not leader.is_formed and engine.drop_state == "normal" and not engine.rank.arena.dropped_layers
        assert engine.pool.telemetry().to_dict() == chunks
    finally:
        engine.close()
