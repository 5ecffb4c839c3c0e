"""The replica side of live migration on two real engines in one process (no Ray): the HTTP layer's
GenerationRun on the source keeps streaming while MigrationManager moves the request; the client's token
ids equal an unmigrated greedy run exactly (copy, recompute, there and back again), and the abort paths
(destination refuses, dies mid-copy, never answers) finish the request on the source with the same tokens.
Both pools return to idle every time."""

from __future__ import annotations

import asyncio

import pytest

from deployments.ingress.generation import GenerationRun
from deployments.ingress.metrics import ServingMetrics
from deployments.migration.endpoint import MigrationEndpoint
from deployments.migration.kv_channel import KVChannels
from deployments.migration.relay import RelayRegistry
from deployments.migration.source import MigrationConfig, MigrationManager, MigrationStats, choose_mode
from engine.api import GenerateRequest
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from tests.deployments.migration.migration_helpers import (
    DeadSourcePeer,
    FailingPeer,
    HangingPeer,
    InProcessCollectivePeer,
    LocalPeer,
    SlowPeer,
)
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle, greedy

pytestmark = pytest.mark.timeout(300)
NUM_NEW = 32
MIGRATE_AFTER = 5  # output tokens the client has seen when the migration starts
CONFIG = MigrationConfig(min_stage_tokens=2, max_stages=3, call_timeout_s=5.0, timeout_s=30.0)


def _engine(**overrides) -> AsyncEngine:
    base = dict(dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=2, max_num_batched_tokens=64,
                tokens_per_page=16, device_memory_bytes=1 << 30, host_buffer_bytes=16 << 20,
                enable_prefix_caching=False)
    base.update(overrides)
    engine = AsyncEngine.from_config(EngineConfig(**base))
    engine.start_thread()
    return engine


@pytest.fixture(scope="module")
def engines():
    source, destination = _engine(), _engine()
    yield source, destination
    source.stop_thread()
    destination.stop_thread()


@pytest.fixture(scope="module")
def prompt(engines):
    return tuple(engines[0].tokenizer(PROMPTS[6]).input_ids)


async def _collect(engine: AsyncEngine, request: GenerateRequest) -> tuple[list[int], str]:
    tokens, text = [], ""
    async for output in engine.generate(request):
        tokens.extend(output.new_token_ids)
        text += output.text_delta
    return tokens, text


@pytest.fixture(scope="module")
def expected(engines, prompt):
    return asyncio.run(_collect(engines[0], GenerateRequest("reference", prompt, greedy(NUM_NEW))))


class Replica:
    """One side's migration parts, as LLMServer wires them."""

    def __init__(self, engine: AsyncEngine, config: MigrationConfig = CONFIG):
        self.engine = engine
        self.relays = RelayRegistry()
        self.stats = MigrationStats()
        self.channels = KVChannels("127.0.0.1", timeout_s=20.0)
        self.endpoint = MigrationEndpoint(engine, config, self.stats, self.relays, self.channels)
        self.config = config

    def manager(self, peer) -> MigrationManager:
        return MigrationManager(self.engine, peer, self.relays, self.config, self.stats)


async def _stream_with_migrations(source: Replica, prompt, migrations, after_migration=None, num_new=NUM_NEW):
    """Streams one request of `num_new` tokens from `source` like the HTTP handler; after MIGRATE_AFTER tokens
    (and again every MIGRATE_AFTER tokens) runs the next of `migrations`: (manager, target, mode), then awaits
    `after_migration()` if given. Returns (token ids, text, outcomes)."""
    metrics = ServingMetrics(lambda: source.engine, "model", "source")
    run = GenerationRun(source.engine, [GenerateRequest("req-0", prompt, greedy(num_new))], metrics, source.relays)
    tokens, text, outcomes, pending = [], "", [], list(migrations)
    await run.start()
    try:
        async for _, output in run.outputs():
            tokens.extend(output.new_token_ids)
            text += output.text_delta
            if pending and len(tokens) >= MIGRATE_AFTER * (len(outcomes) + 1):
                manager, target, mode = pending.pop(0)
                outcomes.append(await manager.migrate("req-0", target, mode))
                if after_migration is not None:
                    await after_migration()
    finally:
        await run.close()
    return tokens, text, outcomes


def _assert_idle(*replicas: Replica) -> None:
    async def check():
        for replica in replicas:
            await replica.engine.run_in_engine(assert_pool_idle)
    asyncio.run(check())


@pytest.mark.parametrize("mode, transport", [("copy", "object_store"), ("recompute", "object_store"),
                                             ("copy", "torch_distributed")])
def test_migrated_stream_equals_the_unmigrated_one(engines, prompt, expected, mode, transport):
    source, destination = Replica(engines[0]), Replica(engines[1])
    if transport == "torch_distributed":
        peer = InProcessCollectivePeer({"B": destination.endpoint}, source.channels)
    else:
        peer = LocalPeer({"B": destination.endpoint})
    tokens, text, outcomes = asyncio.run(
        _stream_with_migrations(source, prompt, [(source.manager(peer), "B", mode)]))
    assert outcomes == ["committed"]
    assert (tokens, text) == expected
    stats = source.stats.snapshot()
    assert (stats["started"], stats["committed"], stats["aborted"], stats[mode]) == (1, 1, 0, 1)
    assert stats["downtime_count"] == 1 and 0 < stats["downtime_max_s"] < 10
    assert destination.stats.snapshot()["adopted"] == 1
    if mode == "copy":
        # staged copies while decoding, then the tail: every token of KV sent once
        assert stats["stages"] >= 2 and stats["bytes_moved"] > 0
        first_write = "migration_connect" if transport == "torch_distributed" else "write_kv"
        assert [call for call, _ in peer.calls][:2] in (["reserve", first_write], ["migration_reserve", first_write])
    else:
        assert stats["bytes_moved"] == 0 and "write_kv" not in [call for call, _ in peer.calls]
    assert len(source.relays) == 0 and len(destination.relays) == 0
    _assert_idle(source, destination)


def test_migrated_there_and_back_again(engines, prompt, expected):
    """A -> B, then B -> A: B's adopt stream forwards the relay of its own migration."""
    a, b = Replica(engines[0]), Replica(engines[1])
    to_b = a.manager(LocalPeer({"B": b.endpoint}))
    to_a = b.manager(LocalPeer({"A": a.endpoint}))
    tokens, text, outcomes = asyncio.run(
        _stream_with_migrations(a, prompt, [(to_b, "B", "copy"), (to_a, "A", "copy")]))
    assert outcomes == ["committed", "committed"]
    assert (tokens, text) == expected
    assert a.stats.snapshot()["adopted"] == 1 and b.stats.snapshot()["adopted"] == 1
    _assert_idle(a, b)


def test_destination_finishes_a_request_whose_source_died_after_the_commit(engines, prompt, expected):
    """The client's stream (on the source) breaks off right after the commit and the source cannot send its
    cancel: the destination runs the request to its end anyway, with the unmigrated run's tokens."""
    source, destination = Replica(engines[0]), Replica(engines[1])
    peer = DeadSourcePeer({"B": destination.endpoint})

    async def scenario():
        metrics = ServingMetrics(lambda: source.engine, "model", "source")
        run = GenerationRun(source.engine, [GenerateRequest("req-0", prompt, greedy(NUM_NEW))], metrics,
                            source.relays)
        await run.start()
        outputs = run.outputs()
        seen = 0
        while seen < MIGRATE_AFTER:
            seen += len((await anext(outputs))[1].new_token_ids)
        assert await source.manager(peer).migrate("req-0", "B", "copy") == "committed"
        await outputs.aclose()
        await run.close()  # the relay's cancel fails: the destination is on its own
        for _ in range(600):
            if destination.stats.num_orphans_finished:
                break
            await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert ("cancel", "B") in peer.calls
    assert destination.stats.snapshot()["orphans_finished"] == 1
    assert list(destination.endpoint.finished_orphans["req-0"]) == expected[0]
    _assert_idle(source, destination)


def test_destination_without_a_free_slot_refuses(engines, prompt, expected):
    source, destination = Replica(engines[0]), Replica(engines[1])

    async def scenario():
        blockers = [destination.engine.generate(GenerateRequest(f"blocker-{i}", prompt, greedy(200)))
                    for i in range(2)]  # max_num_seqs=2: every slot taken
        for blocker in blockers:
            await anext(blocker)

        async def release_blockers():
            for blocker in blockers:
                await blocker.aclose()

        try:
            return await _stream_with_migrations(
                source, prompt, [(source.manager(LocalPeer({"B": destination.endpoint})), "B", "copy")],
                release_blockers)
        finally:
            await release_blockers()

    tokens, text, outcomes = asyncio.run(scenario())
    assert outcomes == ["refused"]
    assert (tokens, text) == expected
    assert destination.stats.snapshot()["incoming_refused"] == 1
    _assert_idle(source, destination)


def test_destination_dying_mid_copy_leaves_the_request_on_the_source(engines, prompt, expected):
    source, destination = Replica(engines[0]), Replica(engines[1])
    peer = FailingPeer({"B": destination.endpoint}, fail_at=2)
    tokens, text, outcomes = asyncio.run(_stream_with_migrations(source, prompt, [(source.manager(peer), "B", "copy")]))
    assert outcomes == ["error"]
    assert (tokens, text) == expected
    assert ("cancel", "B") in peer.calls  # the destination freed its reservation
    _assert_idle(source, destination)


def test_a_slow_link_pauses_before_the_request_outgrows_its_reservation(engines, prompt):
    """Every KV write takes 0.2 s while the request decodes on (~8-25 tokens a stage here). Staging on until a
    stage is small would outgrow the destination's 32-token margin and abort ("outgrew_reservation": what a
    loaded 2-core box hit through Serve); the source pauses once another stage would outgrow it, and the
    migration commits with the unmigrated tokens."""
    num_new = 120
    reference = asyncio.run(_collect(engines[0], GenerateRequest("reference-long", prompt, greedy(num_new))))
    config = MigrationConfig(min_stage_tokens=1, max_stages=16, growth_margin_tokens=32, call_timeout_s=5.0,
                             timeout_s=30.0)
    source, destination = Replica(engines[0], config), Replica(engines[1], config)
    peer = SlowPeer({"B": destination.endpoint}, write_s=0.2)
    tokens, text, outcomes = asyncio.run(
        _stream_with_migrations(source, prompt, [(source.manager(peer), "B", "copy")], num_new=num_new))
    assert outcomes == ["committed"]
    assert (tokens, text) == reference
    stats = source.stats.snapshot()
    assert (stats["committed"], stats["aborted"]) == (1, 0) and stats["stages"] >= 2
    _assert_idle(source, destination)


def test_watchdog_rolls_back_a_stuck_migration(engines, prompt, expected):
    config = MigrationConfig(min_stage_tokens=2, call_timeout_s=30.0, timeout_s=2.0)
    source, destination = Replica(engines[0], config), Replica(engines[1], config)
    peer = HangingPeer({"B": destination.endpoint})
    tokens, text, outcomes = asyncio.run(_stream_with_migrations(source, prompt, [(source.manager(peer), "B", "copy")]))
    assert outcomes == ["timeout"]
    assert (tokens, text) == expected  # paused while the adopt call hung, then resumed here
    assert peer.calls[-1] == ("cancel", "B")
    _assert_idle(source, destination)


def test_at_most_k_migrations_at_once(engines):
    async def scenario():
        manager = Replica(engines[0], MigrationConfig(max_concurrent=1)).manager(HangingPeer({}))
        manager._active["x"] = asyncio.get_running_loop().create_future()  # one already running
        return manager.submit("y", "B"), manager.migrating
    assert asyncio.run(scenario()) == (None, ["x"])


def test_copy_or_recompute_from_bandwidth_and_prefill_rate():
    costs = {"kv_bytes_per_token": 46_080, "step_base_ms": 20.0, "step_per_token_ms": 0.5,
             "max_num_batched_tokens": 512}
    # 1000 tokens: copy 46 MB at 100 MB/s = 0.46 s; recompute 2 steps = 0.54 s
    assert choose_mode(1000, costs, 100e6) == ("copy", pytest.approx(0.4608), pytest.approx(0.54))
    # at 10 MB/s copying takes 4.6 s: recompute
    assert choose_mode(1000, costs, 10e6)[0] == "recompute"
