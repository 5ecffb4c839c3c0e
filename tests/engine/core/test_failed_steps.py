"""A step that fails again and again (a scheduler bug, say) must not spin the engine loop forever: the first
failure ends the running requests; one with nothing running to blame, or the second in a row, ends every
request the engine holds, each stream with an error output. Once the fault is gone the engine serves again,
and a success resets the count (a single failure later ends only the running requests again)."""

from __future__ import annotations

import asyncio

import pytest

from engine.api import GenerateRequest
from engine.async_engine import AsyncEngine
from tests.engine.engine_helpers import Fault, assert_pool_idle, greedy, tiny_engine


@pytest.fixture
def engine(tiny_llama_dir, smollm2_tokenizer):
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer)
    yield engine
    engine.close()


def test_a_repeating_failure_ends_every_request_instead_of_spinning(engine, prompts):
    fault = Fault(engine.scheduler)
    for index in range(3):  # max_num_seqs 2: the third waits
        engine.add_request(GenerateRequest(f"r{index}", tuple(prompts[index]), greedy(8)))
    engine.step()
    assert len(engine.scheduler.running) == 2 and len(engine.scheduler.waiting) == 1
    fault.on = True
    with pytest.raises(RuntimeError):
        engine.step()
    first = engine.fail_running(RuntimeError("scheduler bug"))
    assert sorted(out.request_id for out in first) == ["r0", "r1"]  # the running ones; r2 waits on
    assert all(out.finish_reason == "error" and "scheduler bug" in out.error for out in first)
    with pytest.raises(RuntimeError):
        engine.step()
    second = engine.fail_running(RuntimeError("scheduler bug"))
    assert [out.request_id for out in second] == ["r2"] and not engine.has_work
    assert_pool_idle(engine)
    # fixed: the engine serves again, and a success resets the count
    fault.on = False
    engine.add_request(GenerateRequest("after", tuple(prompts[0]), greedy(4)))
    engine.add_request(GenerateRequest("waiting", tuple(prompts[1]), greedy(4)))
    engine.add_request(GenerateRequest("third", tuple(prompts[2]), greedy(4)))
    engine.step()
    assert engine.fail_running(RuntimeError("once")) and engine.has_work  # only the running ones ended
    assert [request.request_id for request in engine.scheduler.waiting] == ["third"]


def test_the_async_loop_ends_the_streams_of_a_scheduler_that_always_fails(tiny_llama_dir, smollm2_tokenizer, prompts):
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer)  # the AsyncEngine's shutdown closes it
    fault = Fault(engine.scheduler)
    fault.on = True

    async def main():
        async_engine = AsyncEngine(engine)
        await async_engine.start()
        try:
            failed = await asyncio.wait_for(asyncio.gather(*(
                _collect(async_engine, GenerateRequest(f"t{index}", tuple(prompts[index]), greedy(4)))
                for index in range(3))), timeout=30)
            fault.on = False
            healthy = await asyncio.wait_for(
                _collect(async_engine, GenerateRequest("healthy", tuple(prompts[0]), greedy(4))), timeout=30)
            return failed, healthy
        finally:
            await async_engine.shutdown()

    failed, healthy = asyncio.run(main())
    assert [outputs[-1].finish_reason for outputs in failed] == ["error"] * 3
    assert healthy[-1].finish_reason == "length" and sum(len(out.new_token_ids) for out in healthy) == 4


async def _collect(async_engine, request):
    return [output async for output in async_engine.generate(request)]
