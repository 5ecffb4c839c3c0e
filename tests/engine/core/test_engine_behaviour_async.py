"""AsyncEngine on a real LLMEngine: concurrent streams give the sync engine's tokens, closing a stream
early aborts its request and frees its KV, and bad input fails only its own stream.

pytest-asyncio is not installed: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from engine.api import EngineStats, GenerateRequest, InvalidRequestError, RequestOutput, TokenLogprob
from engine.async_engine import AsyncEngine, _coalesce
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from tests.engine.engine_helpers import PROMPTS, assert_pool_idle, greedy, run_all

NUM_NEW = 6
STREAM_PROMPTS = PROMPTS[:4]


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer):
    return [list(smollm2_tokenizer(text).input_ids) for text in STREAM_PROMPTS]


@pytest.fixture(scope="module")
def started(smollm2_tokenizer, prompts):
    """(AsyncEngine running its thread, the sync engine's greedy tokens for `prompts`)."""
    config = EngineConfig(dtype="float32", num_threads=1, max_model_len=256, max_num_seqs=8,
                          max_num_batched_tokens=32, tokens_per_page=16, device_memory_bytes=1 << 30,
                          host_buffer_bytes=16 << 20)
    engine = LLMEngine(config, tokenizer=smollm2_tokenizer)
    # the reference comes from the same engine, stepped synchronously before the thread owns it
    reference = run_all(engine, prompts, greedy(NUM_NEW), prefix="sync")
    assert_pool_idle(engine)
    async_engine = AsyncEngine(engine)
    async_engine.start_thread()
    yield async_engine, [reference[f"sync{i}"] for i in range(len(prompts))]
    async_engine.stop_thread()
    assert not async_engine.is_running


async def stream(async_engine: AsyncEngine, request: GenerateRequest) -> list[RequestOutput]:
    return [output async for output in async_engine.generate(request)]


async def wait_for_stats(async_engine: AsyncEngine, predicate, timeout_s: float = 60.0) -> EngineStats:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = async_engine.stats()
        if predicate(stats):
            return stats
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine stats never reached the condition: {async_engine.stats()}")


def idle(stats: EngineStats) -> bool:
    return stats.kv_chunks_used == 0 and stats.num_running == 0 and stats.num_waiting == 0


def test_concurrent_streams_give_the_sync_engines_tokens(started, prompts, smollm2_tokenizer):
    async_engine, reference = started

    async def main():
        requests = [GenerateRequest(f"stream{i}", tuple(prompt), greedy(NUM_NEW)) for i, prompt in enumerate(prompts)]
        return await asyncio.gather(*(stream(async_engine, request) for request in requests))

    all_outputs = asyncio.run(main())
    for index, outputs in enumerate(all_outputs):
        tokens = [token for output in outputs for token in output.new_token_ids]
        assert tokens == reference[index], f"stream {index}"
        # a consumer that falls behind gets the waiting outputs merged (engine/async_engine.py _coalesce)
        assert [output.finish_reason for output in outputs] == [None] * (len(outputs) - 1) + ["length"]
        counts = [output.num_output_tokens for output in outputs]
        assert counts == list(itertools.accumulate(len(output.new_token_ids) for output in outputs))
        assert counts[-1] == NUM_NEW
        assert all(output.request_id == f"stream{index}" for output in outputs)
        assert outputs[-1].num_prompt_tokens == len(prompts[index])
        assert "".join(output.text_delta for output in outputs) == smollm2_tokenizer.decode(tokens)
    asyncio.run(wait_for_stats(async_engine, idle))
    kv_chunks = async_engine.memory_telemetry()[0]["chunks_per_client"]["kv"]
    assert kv_chunks == async_engine.engine.kv.prefix.num_evictable_chunks > 0


def test_closing_the_stream_early_aborts_and_frees_kv(started, prompts):
    async_engine, _ = started
    engine = async_engine.engine
    max_tokens = 200  # ~200 steps if the abort did not happen

    async def main():
        request = GenerateRequest("early-close", tuple(prompts[2]), greedy(max_tokens))
        received = []
        async for output in async_engine.generate(request):
            received.append(output)
            if len(received) == 2:
                break  # the generator is dropped here: its finalizer must abort the request
        steps_at_break = engine.num_steps
        stats = await wait_for_stats(async_engine, idle)
        return received, steps_at_break, stats

    received, steps_at_break, stats = asyncio.run(main())
    assert [output.finish_reason for output in received] == [None, None]
    assert engine.num_steps - steps_at_break < max_tokens // 4, "the request ran on after its stream closed"
    assert stats.kv_chunks_used == 0
    assert "early-close" not in async_engine._streams

    async def explicit_close():  # aclose() (what an HTTP server does on disconnect) aborts too
        generator = async_engine.generate(GenerateRequest("aclose", tuple(prompts[1]), greedy(max_tokens)))
        first = await generator.__anext__()
        await generator.aclose()
        steps_at_close = engine.num_steps
        await wait_for_stats(async_engine, idle)
        return first, steps_at_close

    first, steps_at_close = asyncio.run(explicit_close())
    assert first.finish_reason is None
    assert engine.num_steps - steps_at_close < max_tokens // 4
    telemetry = async_engine.memory_telemetry()[0]
    assert sum(telemetry["chunks_per_client"].values()) + telemetry["num_free_chunks"] == telemetry["num_chunks"]


def test_bad_input_fails_its_own_stream_only(started, prompts):
    async_engine, reference = started
    too_long = async_engine.max_model_len - len(prompts[0]) + 1

    async def expect_error(request: GenerateRequest) -> InvalidRequestError:
        generator = async_engine.generate(request)
        with pytest.raises(InvalidRequestError) as caught:
            await generator.__anext__()
        return caught.value

    async def main():
        good = [asyncio.create_task(stream(async_engine, GenerateRequest(f"good{i}", tuple(prompts[i]),
                                                                          greedy(NUM_NEW))))
                for i in (0, 3)]
        await asyncio.sleep(0)  # let the good streams register first
        errors = [
            await expect_error(GenerateRequest("empty", (), greedy(4))),
            await expect_error(GenerateRequest("too-long", tuple(prompts[0]), greedy(too_long))),
            await expect_error(GenerateRequest("oov", (1, async_engine.model_config.vocab_size), greedy(4))),
            # a second stream with the id of a running request must not take over the first's stream
            await expect_error(GenerateRequest("good0", tuple(prompts[1]), greedy(4))),
        ]
        return errors, await asyncio.wait_for(asyncio.gather(*good), timeout=60)

    errors, (good0, good3) = asyncio.run(main())
    assert [error.param for error in errors] == ["prompt", "max_tokens", "prompt", "request_id"]
    assert errors[1].code == "context_length_exceeded"
    assert [token for output in good0 for token in output.new_token_ids] == reference[0]
    assert [token for output in good3 for token in output.new_token_ids] == reference[3]
    assert good0[-1].finish_reason == good3[-1].finish_reason == "length"
    assert async_engine.is_running
    asyncio.run(wait_for_stats(async_engine, idle))


def test_outputs_waiting_behind_one_are_merged_into_it_and_an_error_comes_after():
    def output(tokens, text, count, finish=None):
        return RequestOutput("r", tokens, text, finish_reason=finish, num_prompt_tokens=5, num_output_tokens=count,
                             logprobs=tuple(TokenLogprob(t, -1.0, ()) for t in tokens))

    async def main():
        stream = asyncio.Queue()
        waiting = (output((2,), "b", 2), output((3, 4), "cd", 4), output((5,), "e", 5, "length"), output((9,), "x", 6))
        for item in waiting:
            stream.put_nowait(item)
        merged, error = _coalesce(output((1,), "a", 1), stream)
        assert error is None and stream.qsize() == 1  # it stops at the finishing output
        assert merged == output((1, 2, 3, 4, 5), "abcde", 5, "length")
        stream = asyncio.Queue()
        failure = RuntimeError("step failed")
        for item in (output((2,), "b", 2), failure, output((3,), "c", 3)):
            stream.put_nowait(item)
        assert _coalesce(output((1,), "a", 1), stream) == (output((1, 2), "ab", 2), failure)
        assert _coalesce(output((7,), "g", 7), asyncio.Queue()) == (output((7,), "g", 7), None)  # nothing waiting

    asyncio.run(main())
