"""The GPU-scale simulator: it runs the deployed classes; every request finishes exactly once; pools end idle;
the same seed gives the same result; fast-forwarded steps equal step-by-step ones; the bookkeeping KV layout
decides as the engine's; the cost model's arithmetic; traces; the command line."""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import numpy as np
import pytest

from deployments.cluster.state import ClusterCore
from deployments.migration.planner import MigrationPlanner
from deployments.migration.policy import BalanceAndPackPolicy, BalancePolicy, NoMigration
from engine.core.scheduler import Scheduler
from loadtest.sim.__main__ import main
from loadtest.sim.cluster import Cluster, ClusterConfig
from loadtest.sim.cost import CostModel, StepShape, _capped_sum
from loadtest.sim.hardware import get_device
from loadtest.sim.models import get_model
from loadtest.sim.registry import load_all
from loadtest.sim.replica import ReplicaConfig, SimReplica, sim_request
from loadtest.sim.trace import DiurnalTrace, TraceRequest, clip_to_context, load_trace
from memory import ElasticPool
from memory.kv import KVCacheManager

# Llama-3-8B on an A100 with 25% of its memory: 16 GB of weights leave ~5 GB of KV (~40K tokens), so a few
# long requests fill a replica: preemption, balancing and packing all happen within minutes.
SMALL = ReplicaConfig(model="llama-3-8b", device="a100-80g", gpu_memory_utilization=0.25, max_num_seqs=32,
                      max_model_len=16384)


def _trace(seed: int = 1, minutes: float = 4.0, rate: float = 1.2) -> tuple[TraceRequest, ...]:
    trace = DiurnalTrace(hours=minutes / 60, mean_rate_per_s=rate, period_hours=minutes / 60, prompt_median=1500,
                         output_median=1200, output_range=(8, 4000)).generate(seed)
    return clip_to_context(trace, SMALL.max_model_len)


def _run(policy: str, seed: int = 1, minutes: float = 4.0, **changes) -> Cluster:
    config = ClusterConfig(replica=SMALL, num_replicas=3, migration_policy=policy,
                           migration_policy_options={"drain": "newest"} if policy == "balance+pack" else {},
                           seed=seed, **changes)
    return Cluster(_trace(seed, minutes), config).run()


def _assert_idle(cluster: Cluster) -> None:
    for live in cluster.live.values():
        engine = live.replica.engine
        assert engine.is_idle() and engine.pool.num_held("kv") == 0 and not engine.kv.requests
        assert engine.pool.num_held("weights") + engine.pool.num_held("activations") + engine.pool.num_free() \
            == engine.pool.num_chunks


def test_the_simulator_runs_the_deployed_classes():
    cluster = _run("balance+pack", minutes=1.0, autoscale=True, max_replicas=4)
    assert type(cluster.core) is ClusterCore and type(cluster.core.planner) is MigrationPlanner
    assert isinstance(cluster.core.policy, BalanceAndPackPolicy) and isinstance(cluster.core.policy, BalancePolicy)
    engine = cluster.replicas[0].engine
    assert type(engine.scheduler) is Scheduler and type(engine.kv) is KVCacheManager
    assert type(engine.pool) is ElasticPool and engine.pool.backend.name == "sim"
    assert importlib.util.find_spec("loadtest.sim.policies") is None  # no second copy of the policies
    assert isinstance(_run("none", minutes=0.5).core.policy, NoMigration)


@pytest.mark.parametrize("policy,changes", [
    ("none", {"autoscale": True, "max_replicas": 4}), ("balance+pack", {"autoscale": True, "max_replicas": 4}),
    pytest.param("balance", {}, marks=pytest.mark.slow), pytest.param("none", {}, marks=pytest.mark.slow)])
def test_every_request_finishes_once_pools_end_idle_and_runs_repeat(policy, changes):
    first = _run(policy, **changes)
    assert [record.num_finishes for record in first.records] == [1] * len(first.records)
    assert all(record.first_token_s >= record.trace.arrival_s for record in first.records)
    _assert_idle(first)
    second = _run(policy, **changes)
    assert [(r.first_token_s, r.finish_s, r.num_migrations) for r in first.records] == \
        [(r.first_token_s, r.finish_s, r.num_migrations) for r in second.records]
    assert first.counts == second.counts and first.replica_seconds == second.replica_seconds
    if policy == "none":
        assert first.counts["copies"] + first.counts["recomputes"] == 0
    else:
        assert first.counts["copies"] > 0  # the scenario does migrate
    assert sum(r.engine.scheduler.num_preemptions for r in first.replicas) > 0


def _one_replica(config: ReplicaConfig) -> tuple[list[tuple[str, float, float]], SimReplica]:
    """Requests arriving over time on one replica, stepped to the end."""
    finished = []
    replica = SimReplica("r", config, 0.0, lambda request, when: finished.append(
        (request.request_id, request.first_token_time, when)))
    rng = np.random.default_rng(4)
    arrivals = sorted((float(t), int(p), int(o)) for t, p, o in zip(rng.uniform(0, 20, 40), rng.integers(50, 4000, 40),
                                                                     rng.integers(1, 2500, 40), strict=True))
    now, index = 0.0, 0
    while index < len(arrivals) or replica.busy_until is not None or replica.engine.scheduler.has_work:
        end = replica.start(now) if replica.busy_until is None else replica.busy_until
        if index < len(arrivals) and (end is None or arrivals[index][0] < end):
            when, prompt, output = arrivals[index]
            replica.interrupt(when)
            now = max(now, when, replica.clock)
            replica.add(sim_request(f"q{index}", prompt, output, when))
            index += 1
            continue
        assert end is not None, "the replica has work it cannot schedule"
        replica.complete()
        now = end
    return sorted(finished), replica


def test_fast_forward_plans_what_the_scheduler_plans_step_by_step():
    fast, fast_replica = _one_replica(SMALL)
    slow, slow_replica = _one_replica(replace(SMALL, fast_forward=False))
    assert [name for name, _, _ in fast] == [name for name, _, _ in slow] and len(fast) == 40
    assert np.allclose([t for _, t, _ in fast], [t for _, t, _ in slow], rtol=1e-9)
    assert np.allclose([t for _, _, t in fast], [t for _, _, t in slow], rtol=1e-9)
    assert fast_replica.num_steps == slow_replica.num_steps
    assert fast_replica.engine.scheduler.num_preemptions == slow_replica.engine.scheduler.num_preemptions > 0
    assert fast_replica.num_schedules * 5 < slow_replica.num_schedules  # what makes it fast
    assert fast_replica.engine.is_idle() and slow_replica.engine.is_idle()


def test_the_bookkeeping_layout_decides_as_the_engines_layout_and_fused_layers_nearly_so():
    # ~250 MB of KV (~10K tokens) for SmolLM2: the 40 requests preempt each other
    config = replace(SMALL, model="smollm2-135m", device="a100-80g", gpu_memory_utilization=0.006, max_model_len=8192,
                     granularity=64 << 10, fuse_layers=False)
    exact, exact_replica = _one_replica(replace(config, kv_layout="contiguous"))
    books, books_replica = _one_replica(config)
    assert exact == books
    assert exact_replica.engine.scheduler.num_preemptions == books_replica.engine.scheduler.num_preemptions > 0
    # one layer of 32x the heads: the same KV pages in 32x larger chunks (64 MiB for Llama-3-8B); the weights
    # and the activation workspace round up to those chunks, so capacity differs by a few chunks: close results
    fused, _ = _one_replica(SMALL)
    per_layer, _ = _one_replica(replace(SMALL, fuse_layers=False))
    assert sorted(name for name, _, _ in fused) == sorted(name for name, _, _ in per_layer)
    mean = [np.mean([end - first for _, first, end in run]) for run in (fused, per_layer)]
    assert mean[0] == pytest.approx(mean[1], rel=0.05)


def test_cost_model_arithmetic():
    assert _capped_sum(1, 5, None) == 1 + 2 + 3 + 4
    assert _capped_sum(1, 5, 2) == 1 + 2 + 2 + 2
    assert _capped_sum(3, 6, 4) == 3 + 4 + 4
    llama = CostModel(get_model("llama-3-8b"), get_device("h100-80g"))
    decode = llama.step_s(StepShape((1000,) * 8, (), 8))
    assert llama.decode_steps_s([1000] * 8, 3)[0] == pytest.approx(decode)
    # batch-1 decode of an 8B model on an H100 is bound by reading 16 GB of weights: ~6 ms
    assert 5e-3 < llama.step_s(StepShape((1,), (), 1)) < 8e-3
    gemma = CostModel(get_model("gemma-3-12b"), get_device("h100-80g"))
    # 5 of 6 layers slide over 1,024 keys: 100K-token decodes cost far less than 10x their 10K cost
    long, short = gemma.step_s(StepShape((100_000,) * 16, (), 16)), gemma.step_s(StepShape((10_000,) * 16, (), 16))
    assert long < 4 * short  # with every layer global: ~8x
    assert get_model("gemma-3-12b").num_sliding_layers == 40


def test_traces_replay_burstgpt_azure_and_our_csv(tmp_path):
    burst = tmp_path / "burst.csv"
    burst.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                     "5,ChatGPT,100,20,120,Conversation log\n7,GPT-4,50,0,50,Conversation log\n"
                     "6,GPT-4,30,10,40,API log\n")
    assert load_trace(burst) == (TraceRequest(0.0, 100, 20, "ChatGPT"), TraceRequest(1.0, 30, 10, "GPT-4"))
    azure = tmp_path / "azure.csv"
    azure.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"
                     "2023-11-16 18:15:50.9951690,396,109\n")
    trace = load_trace(azure)
    assert [(r.prompt_tokens, r.output_tokens) for r in trace] == [(374, 44), (396, 109)]
    assert trace[0].arrival_s == 0.0 and trace[1].arrival_s == pytest.approx(4.314579)
    ours = tmp_path / "ours.csv"
    ours.write_text("arrival,prompt_tokens,output_tokens\n2.5,10,3\n")
    assert load_trace(ours) == (TraceRequest(0.0, 10, 3),)
    assert DiurnalTrace(hours=0.1).generate(3) == DiurnalTrace(hours=0.1).generate(3)


def test_commands(capsys):
    assert not [name for name, entry in load_all().items() if entry.is_placeholder]  # every seed's experiment is built
    capsys.readouterr()
    assert main(["ellm", "--inputs", "32768", "--requests", "16"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED eLLM" in out and "3x / 2.32x" not in out and "32K" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["mell", "--help"])
    assert exit_info.value.code == 0
