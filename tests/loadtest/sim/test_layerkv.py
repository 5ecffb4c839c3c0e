"""LayerKV in the simulator: the real offloading policy, staging and KV manager on the sim backend; layer-wise
admission starts prompts earlier than whole-request admission; every request finishes once; pools (device and
host) end idle; same seed, same result; the staged-step cost model; the command."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from engine.core.layer_staging import STAGING_CLIENT, LayerStager
from engine.core.offload_policy import LayerwiseOffload, NoOffload
from engine.core.scheduler import Scheduler
from loadtest.sim import executor as sim_executor
from loadtest.sim.__main__ import main
from loadtest.sim.cost import CostModel, StepShape
from loadtest.sim.hardware import get_device
from loadtest.sim.layerkv import burst_trace, replica_config, run_one
from loadtest.sim.models import get_model
from loadtest.sim.registry import load_all
from loadtest.sim.replica import SimEngine
from loadtest.sim.report import Slo
from memory import ElasticPool
from memory.kv import KVCacheManager

SLO = Slo(ttft_s=10.0, tpot_s=0.1)
# 6 prompts of 4-8K tokens at once on a pool with KV for one 8K request: `none` runs them one or two at a time
TRACE = burst_trace(6, (4096, 8192), 128, 0.0, seed=0)


def _run(mode: str, trace=TRACE, kv_requests: int = 1):
    return run_one(trace, replica_config("llama-3-8b", "h100-80g", 8192, 128, kv_requests, 64.0, SLO, mode))


def _assert_idle(cluster) -> None:
    engine = cluster.replicas[0].engine
    assert engine.is_idle() and engine.pool.num_held("kv") == 0 and not engine.kv.requests
    assert engine.host_buffer.used_bytes == 0 and engine.kv.num_offloaded_host_chunks == 0
    assert engine.pool.num_held("weights") + engine.pool.num_held("activations") + engine.pool.num_free() \
        == engine.pool.num_chunks


def test_layerwise_admits_prompts_earlier_every_request_finishes_once_and_pools_end_idle():
    none, none_cluster = _run("none")
    layerwise, layer_cluster = _run("layerwise")
    for cluster in (none_cluster, layer_cluster):
        assert [record.num_finishes for record in cluster.records] == [1] * len(TRACE)
        _assert_idle(cluster)
    engine = layer_cluster.replicas[0].engine
    assert type(engine.scheduler) is Scheduler and type(engine.kv) is KVCacheManager
    assert type(engine.pool) is ElasticPool and engine.pool.backend.name == "sim"
    assert type(engine.scheduler.offload) is LayerwiseOffload
    assert type(none_cluster.replicas[0].engine.scheduler.offload) is NoOffload
    assert sim_executor.LayerStager is LayerStager  # the executor stages with the engine's stager
    policy = engine.scheduler.offload
    assert policy.num_partial_admissions > 0 and policy.num_demotions > 0
    assert engine.runner.bytes_fetched > 0 and none_cluster.replicas[0].engine.runner.bytes_fetched == 0
    # layer-wise: the second prompt starts while the first decodes; without it, only once the first is done
    none_starts = sorted(none_cluster.replicas[0].admitted_at.values())
    layer_starts = sorted(layer_cluster.replicas[0].admitted_at.values())
    assert layer_starts[1] < none_starts[1] / 5
    assert sum(layer_starts) < sum(none_starts)
    assert layerwise.ttft_s.mean() < none.ttft_s.mean()
    assert np.median(layerwise.tpot_s) > np.median(none.tpot_s)  # decodes wait on PCIe copies


def test_same_seed_same_result():
    first, _ = _run("layerwise")
    second, _ = _run("layerwise")
    assert np.array_equal(first.ttft_s, second.ttft_s) and np.array_equal(first.tpot_s, second.tpot_s)
    other = burst_trace(6, (4096, 8192), 128, 0.0, seed=1)
    assert [r.prompt_tokens for r in other] != [r.prompt_tokens for r in TRACE]


def test_staging_is_charged_to_activations_and_the_budget_holds(monkeypatch):
    peaks = []
    original = LayerStager.__init__

    def watch(self, *args, **kwargs):
        original(self, *args, **kwargs)
        pool = self.pool
        peaks.append((self.num_chunks, pool.num_held(STAGING_CLIENT)))
        assert sum(pool.num_held(client) for client in ("weights", "kv", STAGING_CLIENT)) + pool.num_free() \
            == pool.num_chunks

    monkeypatch.setattr(LayerStager, "__init__", watch)
    _run("layerwise")
    assert peaks and all(held >= staging > 0 for staging, held in peaks)


def test_staged_step_cost_overlaps_copies_with_compute():
    model = CostModel(get_model("llama-3-8b"), get_device("h100-80g"))
    layers = model.model.num_layers
    rate = get_device("h100-80g").pcie_bytes_per_s * get_device("h100-80g").pcie_efficiency
    compute = 0.032  # 1 ms a layer
    # nothing staged: the compute alone
    assert model.staged_s(compute, ((0, 0),) * layers) == pytest.approx(compute)
    # copies shorter than a layer hide behind compute, but for the first fetch
    small = int(0.5e-3 * rate)
    assert model.staged_s(compute, ((small, 0),) * layers) == pytest.approx(compute + 0.5e-3)
    # copies longer than a layer: the copy engine is the bottleneck (every fetch, every write-back)
    big = int(4e-3 * rate)
    assert model.staged_s(compute, ((big, big // 4),) * layers) == pytest.approx(
        layers * 5e-3, rel=0.05)
    # a step's shape carries its staged bytes into step_s
    plain = StepShape((8192,) * 4, (), 4)
    staged = StepShape((8192,) * 4, (), 4, ((big, 0),) * layers)
    assert model.step_s(staged) > model.step_s(plain) + 0.9 * layers * 4e-3


def test_layerwise_needs_per_layer_kv_and_a_host_buffer():
    config = replica_config("llama-3-8b", "h100-80g", 8192, 128, 1, 64.0, SLO, "layerwise")
    with pytest.raises(ValueError, match="fuse_layers"):
        SimEngine(replace(config, fuse_layers=True))
    with pytest.raises(ValueError, match="host buffer"):
        SimEngine(replace(config, host_buffer_bytes=0))


def test_the_command_prints_a_simulated_table(capsys):
    assert not load_all()["layerkv"].is_placeholder
    assert main(["layerkv", "--requests", "4", "--prompts", "2048,4096", "--output", "16", "--kv-requests", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SIMULATED: none vs layerwise") and "TTFT p99" in out and "69x" in out


def test_fast_forward_changes_nothing_with_offloaded_layers():
    config = replica_config("llama-3-8b", "h100-80g", 8192, 128, 1, 64.0, SLO, "layerwise")
    fast, fast_cluster = run_one(TRACE, config)
    slow, slow_cluster = run_one(TRACE, replace(config, fast_forward=False))
    assert np.allclose(fast.ttft_s, slow.ttft_s, rtol=1e-9) and np.allclose(fast.tpot_s, slow.tpot_s, rtol=1e-9)
    assert fast_cluster.replicas[0].num_steps == slow_cluster.replicas[0].num_steps
    assert fast_cluster.replicas[0].num_schedules < slow_cluster.replicas[0].num_schedules


def test_a_queued_burst_starts_at_once_and_ends_no_later():
    """LayerKV's case: outputs long enough that whole-request admission queues. `layerwise` prefills every
    prompt at once (parked on the host after its first token, made whole as memory frees): p99 TTFT several
    times lower, the burst's makespan no worse than 1.1x, SLO attainment no lower, and the device layers of
    parked requests are not sent round (each promotion makes a decode whole)."""
    trace = burst_trace(16, (2048, 2048), 512, 0.0, seed=0)
    runs = {mode: run_one(trace, replica_config("llama-3-8b", "h100-80g", 2048, 512, 4, 64.0, SLO, mode))
            for mode in ("none", "layerwise")}
    none, layerwise = runs["none"][0], runs["layerwise"][0]
    assert np.percentile(layerwise.ttft_s, 99) < np.percentile(none.ttft_s, 99) / 5
    assert layerwise.hours <= 1.1 * none.hours
    assert layerwise.attainment(SLO) >= none.attainment(SLO)
    policy = runs["layerwise"][1].replicas[0].engine.scheduler.offload
    assert policy.num_partial_admissions >= 8
    assert policy.num_demotions < 2 * 32 * len(trace)  # no churn: at most a couple of moves per layer
    _assert_idle(runs["layerwise"][1])
