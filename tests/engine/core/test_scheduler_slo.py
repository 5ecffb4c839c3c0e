"""SLO-aware token budget: a TPOT target caps prefill tokens per step; a waiting request about to miss
its TTFT target lifts the cap. Runs the real scheduler and KV manager on the sim backend."""

from __future__ import annotations

import time

import torch

from engine.core.request import Request, RequestStatus
from engine.core.sampler import SamplingState
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.step_cost import StepCostModel
from engine.sampling_params import SamplingParams
from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup


def _scheduler(tpot_slo_ms=None, ttft_slo_ms=None, tpot_margin=1.0) -> Scheduler:
    spec = KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype_bytes=2, groups=(LayerGroup((0, 1), None),),
                       max_slots=8, max_len=8192, tokens_per_page=1024)
    kv = KVCacheManager(spec, ElasticPool(create_backend("sim"), 8 << 30, spec.page_bytes), torch.bfloat16)
    cost = StepCostModel(base_ms=10.0, per_token_ms=1.0)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=8192,
                             tpot_slo_ms=tpot_slo_ms, ttft_slo_ms=ttft_slo_ms, tpot_margin=tpot_margin)
    return Scheduler(config, kv, activation_chunks=lambda tokens, sampled: 0, cost_model=cost)


def _request(name: str, arrival: float, num_prompt: int = 300) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=8)
    return Request(name, list(range(num_prompt)), params, SamplingState(params), None, arrival)


def test_tpot_target_caps_prefill_tokens_per_step():
    scheduler = _scheduler(tpot_slo_ms=50.0)
    scheduler.running = [_request("a", time.monotonic()), _request("b", time.monotonic())]
    for request in scheduler.running:
        request.status = RequestStatus.RUNNING
    assert scheduler._token_budget() == 40  # (50 ms - 10 ms base) / 1 ms per token
    assert _scheduler()._token_budget() == 512
    margined = _scheduler(tpot_slo_ms=50.0, tpot_margin=0.8)
    margined.running = scheduler.running
    assert margined._token_budget() == 30  # (0.8 x 50 ms - 10 ms) / 1 ms: a margin below the target


def test_request_about_to_miss_ttft_lifts_the_cap():
    scheduler = _scheduler(tpot_slo_ms=50.0, ttft_slo_ms=500.0)
    scheduler.running = [_request("a", time.monotonic())]
    scheduler.waiting.append(_request("fresh", time.monotonic()))
    assert scheduler._token_budget() == 40
    scheduler.waiting.appendleft(_request("late", time.monotonic() - 0.4))  # 400 ms + 300 ms prefill > 500
    assert scheduler._token_budget() == 512
    scheduler.waiting[0].arrival_time -= 0.2  # 600 ms: its TTFT is lost, the running decodes' TPOT is not
    assert scheduler._token_budget() == 40


def test_cost_model_learns_a_line():
    model = StepCostModel()
    for tokens in (10, 50, 100, 200, 400):
        model.observe(tokens, 5.0 + 0.25 * tokens)
    assert abs(model.per_token_ms - 0.25) < 1e-6 and abs(model.base_ms - 5.0) < 1e-6
    assert model.max_tokens_within(30.0) == 100
