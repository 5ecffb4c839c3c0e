"""The simulator's KunServe experiment: the deployed drop plan over typed telemetry, the engine's pair
bookkeeping (PipelineKV, carry) with weight chunks dropped to KV and restored, the pipeline's step time,
and the experiment's direction: on a spike that overflows tight pools, dropping lowers the tail TTFT.
Every request finishes exactly once, pools end idle with every weight back, the same seed repeats."""

from __future__ import annotations

import numpy as np
import pytest

import loadtest.sim.kunserve as kunserve
from deployments.cluster import drop_plan
from deployments.cluster.drop_plan import DropOrder, DroppingConfig
from engine.cooperative.kv import PipelineKV
from engine.cooperative.pipeline import MicroBatchCut
from engine.core.scheduler import ScheduledChunk, SchedulerOutput
from loadtest.sim.__main__ import main
from loadtest.sim.cluster import ClusterConfig
from loadtest.sim.cost import CostModel, StepShape
from loadtest.sim.executor import step_shape
from loadtest.sim.hardware import get_device
from loadtest.sim.kunserve import compare, run_variant
from loadtest.sim.models import get_model
from loadtest.sim.pair import PipelineExecutor, PipelineOptions, SimPair
from loadtest.sim.replica import ReplicaConfig, SimReplica, sim_request
from loadtest.sim.report import Slo
from loadtest.sim.trace import SpikeTrace

TIGHT = ReplicaConfig(gpu_memory_utilization=0.3, fuse_layers=False)  # Llama-3-8B: ~9 GB of KV per H100


def test_micro_batches_keep_every_token_and_stage_costs_add_up():
    decodes = tuple(ScheduledChunk(f"d{i}", i, context - 1, (7,), True) for i, context in enumerate((100, 200, 300)))
    prefills = (ScheduledChunk("p", 3, 0, tuple(range(1000)), True),
                ScheduledChunk("q", 4, 64, tuple(range(500)), False))
    plan = SchedulerOutput(decodes, prefills, (), 0)
    parts = [step_shape(micro) for micro in MicroBatchCut().cut(plan)]  # the engine's cut, as the simulator's
    assert [part.num_tokens for part in parts] == [752, 751]
    assert parts[0].prefills == ((749, 0),) and parts[1].prefills == ((251, 749), (500, 64))
    assert [part.num_sampled for part in parts] == [3, 1] and parts[0].decode_contexts == (100, 200, 300)
    model, device = get_model("llama-3-8b"), get_device("h100-80g")
    full = CostModel(model, device)
    first = CostModel(model, device, range(0, 16), head=False)
    second = CostModel(model, device, range(16, 32), head=True)
    decode = StepShape(tuple(range(1000, 1064)), (), 64)
    assert full.step_s(decode) <= first.step_s(decode) + second.step_s(decode) <= 1.01 * full.step_s(decode)
    assert first.step_s(decode) < second.step_s(decode)  # the LM head and sampling are stage 2's


def test_the_simulated_pipeline_cuts_decode_steps_as_the_engine_does():
    model, device = get_model("llama-3-8b"), get_device("h100-80g")
    contexts = [1000 + 10 * i for i in range(16)]
    plan = SchedulerOutput(tuple(ScheduledChunk(f"d{i}", i, c - 1, (7,), True) for i, c in enumerate(contexts)),
                           (), (), 0)
    whole, cut = (PipelineExecutor(None, CostModel(model, device), 16, device.nvlink_bytes_per_s,
                                   PipelineOptions(min_decode_rows=rows)) for rows in (0, 4))
    for executor in (whole, cut):  # the batched decode path and the step path give the same time
        assert executor.decode_steps_s(contexts, 1)[0] == pytest.approx(executor.step_s(plan))
    assert whole.bubble_ratio > 0.45 and cut.bubble_ratio < whole.bubble_ratio - 0.1  # both stages busy
    assert cut.wall_s > whole.wall_s  # but a weight-bound decode streams each stage's weights twice


def test_a_pair_drops_weights_to_kv_serves_as_a_pipeline_and_restores():
    finished: list[str] = []
    first, second = (SimReplica(f"r{i}", TIGHT, 0.0, lambda request, when: finished.append(request.request_id))
                     for i in range(2))
    for index in range(6):
        (first if index % 2 else second).add(sim_request(f"q{index}", 3000, 64, 0.0))
    for replica in (first, second):
        replica.start(0.0)
        replica.complete()
    weights, available = first.engine.pool.num_held("weights"), first.engine.kv.num_available_chunks()
    pair = SimPair(first, second, DropOrder("r0", "r1", first_keeps=28, second_from=2), PipelineOptions(carry="copy"))
    freed = pair.drop(first.clock)
    per_layer = first.engine.chunks_per_layer
    assert freed == (4 + 2) * per_layer and first.engine.pool.num_held("weights") == weights - 4 * per_layer
    assert type(first.engine.scheduler.kv) is PipelineKV and pair.split == 16
    assert first.engine.kv.held_layers == frozenset(range(16)) and not second.engine.scheduler.has_work
    assert len(first.engine.scheduler.requests) == 6 and pair.num_carried == 2  # the two prefilling kept their KV
    assert {pair.homes[f"q{i}"].replica_id for i in range(6)} == {"r0", "r1"}
    assert first.engine.kv.num_available_chunks() > available  # the dropped layers' chunks hold KV now
    # the plan's grow: 2 more layers on the first, 3 on the second, straight to KV; the cut stays
    with pytest.raises(ValueError, match="cut"):
        pair.grow(DropOrder("r0", "r1", first_keeps=15, second_from=2))
    kv_before = [replica.engine.kv.num_available_chunks() for replica in (first, second)]
    assert pair.grow(DropOrder("r0", "r1", first_keeps=26, second_from=5)) == (2 + 3) * per_layer
    assert [replica.engine.kv.num_available_chunks() for replica in (first, second)] == [
        kv_before[0] + 2 * per_layer, kv_before[1] + 3 * per_layer]
    assert first.engine.pool.num_held("weights") == weights - 6 * per_layer and pair.split == 16
    now = first.clock
    while (end := first.start(now)) is not None:
        first.complete()
        now = end
    assert sorted(finished) == [f"q{i}" for i in range(6)] and pair.runner.bubble_ratio > 0
    pair.restore(now)
    for replica in (first, second):
        engine = replica.engine
        assert engine.pool.num_held("weights") == weights and not engine.dropped and engine.is_idle()
        assert engine.kv.held_layers == frozenset(range(32)) and type(engine.scheduler.kv) is not PipelineKV
        engine.close()


def test_dropping_lowers_the_spike_tail_ttft_every_request_finishes_once_and_runs_repeat():
    assert kunserve.plan_drops is drop_plan.plan_drops  # the deployed plan, not a copy
    spike = SpikeTrace()  # 0.3 req/s, x4 for 30 s: 4K-token prompts, 2K-token outputs overflow ~9 GB pools
    results = compare(spike, TIGHT, 2, 0, Slo(), DroppingConfig(enabled=True))  # run_variant checks the pools
    none, dropping = results["none"], results["dropping"]
    assert len(dropping.log.drops) >= 1 and len(dropping.log.restores) == len(dropping.log.drops)
    assert np.percentile(dropping.spike_ttft_s, 99) * 5 < np.percentile(none.spike_ttft_s, 99)
    assert dropping.run.tpot_s.mean() < 2 * none.run.tpot_s.mean()
    config = ClusterConfig(replica=TIGHT, num_replicas=2, seed=0)
    again = run_variant(spike.generate(0), spike, config, "again", DroppingConfig(enabled=True), Slo())
    assert np.array_equal(again.run.ttft_s, dropping.run.ttft_s) and again.log.drops == dropping.log.drops


def test_kunserve_command(capsys):
    assert main(["kunserve", "--seconds", "30", "--spike-at", "5", "--spike-s", "10"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED KunServe" in out and "72.2x" in out and "parameter dropping" in out


@pytest.mark.parametrize("bad", [DropOrder("r0", "r1", first_keeps=10, second_from=20)])
def test_a_pair_must_hold_every_layer(bad):
    replicas = [SimReplica(f"r{i}", TIGHT, 0.0, lambda request, when: None) for i in range(2)]
    with pytest.raises(ValueError, match="together all of them"):
        SimPair(*replicas, bad, PipelineOptions())
    for replica in replicas:
        replica.engine.close()
