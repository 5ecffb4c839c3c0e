"""n > 1 through the HTTP layer's GenerationRun on a real engine: the choices of one OpenAI request are prefilled
once and forked, and closing the run (the client left) aborts every choice and frees all their KV.

pytest-asyncio is not installed: the test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import time

from deployments.ingress.generation import GenerationRun
from deployments.ingress.metrics import ServingMetrics
from engine.api import GenerateRequest
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.text.tokenizer import load_tokenizer
from engine.weights import resolve_model_source
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle


def test_closing_the_run_aborts_every_forked_choice():
    smollm2_tokenizer = load_tokenizer(resolve_model_source(None))
    prompt = tuple(smollm2_tokenizer(PROMPTS[6]).input_ids)  # 36 tokens: two prefill chunks of 32
    config = EngineConfig(dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=8,
                          max_num_batched_tokens=32, tokens_per_page=16, device_memory_bytes=1 << 30,
                          host_buffer_bytes=16 << 20)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    prefill_tokens = []
    forks = []
    engine.scheduler.plan_observers.append(lambda plan: (
        prefill_tokens.append(sum(len(chunk.token_ids) for chunk in plan.prefills)), forks.extend(plan.forks)))
    async_engine = AsyncEngine(engine)
    async_engine.start_thread()

    async def scenario() -> dict[int, int]:
        params = [SamplingParams(temperature=1.0, top_p=0.9, seed=11 + index, max_tokens=200, ignore_eos=True)
                  for index in range(3)]
        requests = [GenerateRequest(f"cmpl-n-{index}", prompt, param, time.monotonic(), prompt_group="cmpl-n")
                    for index, param in enumerate(params)]
        run = GenerationRun(async_engine, requests, ServingMetrics(lambda: async_engine, "m", "r"))
        received = {0: 0, 1: 0, 2: 0}
        try:
            await run.start()
            async for index, output in run.outputs():
                received[index] += len(output.new_token_ids)
                if min(received.values()) >= 3:
                    break  # the client leaves mid-stream
        finally:
            await run.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            stats = async_engine.stats()
            if stats.num_running == stats.num_waiting == stats.num_swapped == 0:
                break
            await asyncio.sleep(0.02)
        return received

    try:
        received = asyncio.run(scenario())
        assert min(received.values()) >= 3
        assert forks == [("cmpl-n-0", ("cmpl-n-1", "cmpl-n-2"))]  # both followers forked the leader's KV
        assert sum(prefill_tokens) == len(prompt)  # the prompt was prefilled once
        assert not engine.scheduler.requests  # every choice was aborted
        assert_pool_idle(engine)  # (the engine thread is idle: nothing is left to step)
    finally:
        async_engine.stop_thread()  # closes the engine
