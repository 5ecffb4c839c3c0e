"""The `slo` memory arbiter swapping decodes out of a real engine so that a late prompt gets a larger chunk:
the greedy tokens of every request (the swapped ones included) equal transformers' fp32 tokens, every step's
workspace is obtainable before it runs and the pool is never over its budget.

The state is made deterministic: a frozen clock (the prompt's wait is 0 ms) and a frozen step-cost model
(10 ms + 1 ms per token), so the arbiter's predictions do not depend on the box's speed. After the long
prompt's first (ceiling) chunk, another tenant of the pool (a `pressure` client, as a second model's weights
would be) takes all but what a floor step needs, so the chunk policy alone falls back to the floor: 7 steps
of 26 ms for the prompt's last 76 tokens (182 ms) against a 150 ms TTFT target. A budget of 32 meets it
(3 steps of 42 ms) once one decode is swapped out, and no decode has a TPOT target, so each may wait. The
pool still holds what every request needs on its own, so the run goes on to the end (later, the ordinary
preemption path swaps the prompt itself out once, and everyone comes back).
"""

from __future__ import annotations

import dataclasses

import pytest

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.step_cost import StepCostModel
from tests.engine.core.test_chunk_policy import checked_steps
from tests.engine.engine_helpers import assert_pool_idle, greedy
from tests.engine.reference import hf_greedy

FLOOR, CEILING = 16, 128
NUM_NEW = 16
NOW = 5000.0


class FrozenCost(StepCostModel):
    def observe_step(self, *args, **kwargs) -> None:  # the predictions stay 10 ms + 1 ms per token
        pass


@pytest.fixture(scope="module")
def requests(prompts):
    long_prompt = ([token for prompt in prompts for token in prompt] * 3)[:200]
    assert len(long_prompt) == 200
    return [list(prompts[index]) for index in (6, 4, 2, 7)] + [long_prompt]


@pytest.fixture(scope="module")
def reference(requests, hf_smollm2):
    return hf_greedy(hf_smollm2, requests, NUM_NEW)


@pytest.mark.slow  # transformers' reference for a 200-token prompt, and ~40 engine steps: about 1-2 min
def test_slo_arbiter_swaps_decodes_for_a_larger_chunk_and_keeps_greedy_tokens(smollm2_tokenizer, requests,
                                                                              reference):
    config = EngineConfig(dtype="float32", num_threads=2, max_model_len=512, max_num_seqs=8,
                          max_num_batched_tokens=FLOOR, max_prefill_chunk_tokens=CEILING, tokens_per_page=16,
                          device_memory_bytes=1 << 30, host_buffer_bytes=64 << 20, enable_prefix_caching=False,
                          preemption_mode="swap", memory_arbiter="slo", ttft_slo_ms=150.0)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    scheduler = engine.scheduler
    cost = FrozenCost(base_ms=10.0, per_token_ms=1.0)
    scheduler.cost_model = cost
    scheduler.arbiter.step_ms = cost.predict_ms
    scheduler.clock = lambda: NOW
    scheduler.slo = dataclasses.replace(scheduler.slo, clock=scheduler.clock)
    pool = engine.pool
    pool.register("pressure")
    pressure = []
    tokens: dict[str, list[int]] = {}
    try:
        for index, prompt in enumerate(requests[:4]):
            engine.add_request(GenerateRequest(f"d{index}", tuple(prompt), greedy(NUM_NEW), arrival_time=NOW))
        while any(len(tokens.get(f"d{index}", [])) < 2 for index in range(4)):  # all four decoding
            checked_steps(engine, tokens, 1)
        engine.add_request(GenerateRequest("p", tuple(requests[4]), greedy(NUM_NEW), arrival_time=NOW))
        checked_steps(engine, tokens, 1)
        prompt = scheduler.requests["p"]
        assert prompt.num_computed_tokens == CEILING - 4  # the first chunk took the ceiling
        # the pool's other tenant leaves room for a floor step only: 32 does not fit
        policy, memory = scheduler.chunk_policy, scheduler._step_memory()
        need_32 = (policy.activation_chunks(32, memory.sampled_rows) + memory.next_kv_chunks
                   + policy.kv_chunks(32 - memory.num_running))
        pressure = pool.inflate("pressure", memory.available_chunks - need_32 + 1)
        assert policy.fitting_budget(scheduler._step_memory()) == FLOOR
        checked_steps(engine, tokens, 1)
        assert scheduler.arbiter.actions["swap"] == 1 and scheduler.num_swaps == 1
        assert [r.request_id for r in scheduler.swapped] == ["d3"]  # the youngest decode
        assert scheduler.requests["p"].num_computed_tokens == CEILING - 4 + 32 - 3  # 3 decodes + 29 prompt tokens
        checked_steps(engine, tokens, None)
        assert pool.telemetry().num_exhausted == 0
        for index, expected in enumerate(reference):
            name = f"d{index}" if index < 4 else "p"
            assert tokens[name][: len(expected)] == expected, name
        assert all(len(tokens[name]) == NUM_NEW for name in tokens)
        pool.deflate("pressure", pressure)
        pressure = []
        assert_pool_idle(engine)
    finally:
        if pressure:
            pool.deflate("pressure", pressure)
        engine.close()
