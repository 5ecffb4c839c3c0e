"""TTFT growth (KunServe's telemetry): recent TTFT relative to the replica's unloaded baseline, each
request's TTFT taken against the step-cost model's prediction for its prompt; queued requests count."""

from __future__ import annotations

import pytest

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.step_cost import StepCostModel
from engine.core.ttft_growth import TtftGrowth, expected_ttft_s
from tests.engine.engine_helpers import greedy


def test_expected_ttft_is_the_prompt_prefilled_alone_in_budget_chunks():
    cost = StepCostModel(base_ms=10.0, per_token_ms=1.0)
    assert expected_ttft_s(cost, 100, 64) == pytest.approx((10 + 64 + 10 + 36) / 1e3)
    assert expected_ttft_s(cost, 64, 64) == pytest.approx(0.074)


def test_growth_is_recent_over_the_unloaded_baseline_and_sees_a_stuck_queue():
    growth = TtftGrowth(window_s=10.0)
    assert growth.growth(0.0, [(0.0, 0.1)]) == 1.0  # no baseline yet
    for i in range(5):  # unloaded: TTFT 1.5x the prediction (the step it arrived in, decodes beside it)
        growth.observe(float(i), i + 0.15, 0.1, unloaded=True)
    assert growth.growth(5.0) == pytest.approx(1.0)
    growth.observe(6.0, 6.6, 0.1, unloaded=False)  # loaded: 6x the prediction, 4x the baseline
    assert growth.growth(7.0) == pytest.approx((1.5 * 5 + 6.0) / 6 / 1.5)  # the mean of the last 10 s
    assert growth.growth(7.0, [(5.0, 0.1)]) == pytest.approx(20 / 1.5)  # queued 2 s for a 0.1 s prefill
    assert growth.growth(30.0) == 1.0  # nothing recent


def test_an_engine_reports_growth_when_requests_queue(tiny_qwen3_dir, smollm2_tokenizer, prompts):
    engine = LLMEngine(EngineConfig(model=str(tiny_qwen3_dir), dtype="float32", num_threads=1, max_model_len=256,
                                    max_num_seqs=1, max_num_batched_tokens=64, device_memory_bytes=64 << 20),
                       tokenizer=smollm2_tokenizer)
    engine.add_request(GenerateRequest("alone", tuple(prompts[0]), greedy(4)))
    while engine.has_work:
        engine.step()
    assert engine.scheduler.requests == {} and len(engine.ttft._baseline) == 1
    for i in range(4):  # one at a time (max_num_seqs=1): the others wait many steps for their first token
        engine.add_request(GenerateRequest(f"q{i}", tuple(prompts[1]), greedy(24)))
    for _ in range(40):
        engine.step()
    assert engine.stats().ttft_growth > 2.0
    engine.close()
