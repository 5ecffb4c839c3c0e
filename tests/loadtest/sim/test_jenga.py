"""The simulator's Jenga experiment: two models' KV managers (paged decisions, LCM small pages) in one
device's pool, run by the engine's schedulers taking turns. Every request finishes exactly once, the pool
ends idle, the same seed gives the same result, fast-forward equals step-by-step, the bookkeeping layout
decides as the engine's `paged` one, and LCM holds more requests at once than padding on the mix."""

from __future__ import annotations

from dataclasses import replace

import pytest

from engine.core.scheduler import Scheduler
from loadtest.sim.__main__ import main
from loadtest.sim.jenga import compare, run_batch, workload
from loadtest.sim.replica import ReplicaConfig, SharedDevice, SimEngine
from memory.kv import KVCacheManager
from memory.kv.block_source import LcmBlocks
from memory.page_policies import PadToLargest

MIX = ("gemma-3-12b", "llama-3-8b")
# both models' weights (~40 GB) leave ~12 GB for KV and activations on 70% of an H100: ~20 requests fill it
CONFIGS = [ReplicaConfig(model=model, gpu_memory_utilization=0.7, max_num_seqs=32, max_model_len=8192,
                         fuse_layers=False, kv_layout="bookkeeping-paged") for model in MIX]
REQUESTS = workload(MIX, 48, (2048, 6144), (16, 64), seed=3)


def test_the_device_runs_the_deployed_classes_on_one_balloon():
    shared = SharedDevice(CONFIGS, PadToLargest())
    engines = [SimEngine(config, shared=shared) for config in CONFIGS]
    try:
        for engine in engines:
            assert type(engine.scheduler) is Scheduler and type(engine.kv) is KVCacheManager
            assert type(engine.kv.blocks) is LcmBlocks and engine.kv.blocks.balloon is shared.balloon
        sizes = shared.balloon.allocator.allocated_page_bytes
        assert set(sizes) == {"gemma-3-12b/g0", "gemma-3-12b/g1", "llama-3-8b/g0"}
        assert set(sizes.values()) == {80 * shared.chunk_bytes}  # 40 sliding layers x K and V: the largest
    finally:
        for engine in engines:
            engine.close()
        shared.close()


def test_every_request_finishes_once_the_pool_ends_idle_and_runs_repeat():
    first = compare(CONFIGS, REQUESTS)  # run_batch itself asserts exactly-once finishes and an idle device
    assert first["lcm"] == compare(CONFIGS, REQUESTS, allocators=("lcm",))["lcm"]
    assert all(result.num_requests == len(REQUESTS) for result in first.values())


def test_lcm_holds_more_requests_at_once_than_padding_on_the_mix():
    results = compare(CONFIGS, REQUESTS, allocators=("lcm", "pad_to_largest"))
    lcm, pad = results["lcm"], results["pad_to_largest"]
    assert lcm.max_running >= 1.3 * pad.max_running and lcm.mean_running > pad.mean_running
    assert lcm.page_utilisation > 0.8 > 0.6 > pad.page_utilisation
    assert lcm.output_tokens_per_s > pad.output_tokens_per_s


def test_fast_forward_on_a_shared_device_equals_step_by_step():
    fast = run_batch(CONFIGS, REQUESTS, "lcm", "fast")
    slow = run_batch([replace(config, fast_forward=False) for config in CONFIGS], REQUESTS, "lcm", "slow")
    assert fast.finish_s == pytest.approx(slow.finish_s, rel=1e-9)
    assert (fast.max_running, fast.num_preemptions) == (slow.max_running, slow.num_preemptions)


def test_the_bookkeeping_layout_decides_as_the_engines_paged_layout():
    configs = [replace(config, max_num_seqs=8) for config in CONFIGS]
    requests = REQUESTS[:12]
    ours = run_batch(configs, requests, "lcm", "bookkeeping")
    engine = run_batch([replace(config, kv_layout="paged") for config in configs], requests, "lcm", "paged")
    assert ours.finish_s == engine.finish_s and ours.num_preemptions == engine.num_preemptions


def test_jenga_command(capsys):
    assert main(["jenga", "--requests", "6", "--prompts", "1024,2048", "--outputs", "8,16"]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED Jenga" in out and "79.6%" in out and "pad_to_largest" in out and "static_partition" in out
