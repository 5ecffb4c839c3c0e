"""AsyncEngine on a real LLMEngine: concurrent streams give the sync engine's tokens, closing a stream
early aborts its request and frees its KV, and bad input fails only its own stream. Stream pacing
(engine/stream_pacer.py): many streams get few chunks with the unpaced run's tokens, text and logprobs; paced
off, one chunk per token; an error comes after the tokens held for it.

pytest-asyncio is not installed: each test runs its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import time

import pytest

from engine.api import EngineStats, GenerateRequest, InvalidRequestError, RequestOutput, TokenLogprob
from engine.async_engine import AsyncEngine, _coalesce
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.stream_pacer import PacedStream, pace_interval
from tests.engine.engine_helpers import PROMPTS, Fault, assert_pool_idle, greedy, run_all, tiny_engine

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


def test_peak_tokens_count_a_request_from_its_arrival_to_its_end(started, prompts):
    """What KunServe's drop plan sees of a spike before the engine thread takes the requests in: each live
    request's tokens at its last possible token (prompt + max_tokens, at most the context)."""
    async_engine, _ = started

    heard: list[list[int]] = []  # what an arrival listener sees: the arriving request already counted
    async_engine.add_arrival_listener(lambda: heard.append(sorted(async_engine.peak_tokens())))
    async_engine.add_arrival_listener(lambda: 1 / 0)  # a failing listener fails no request

    async def main():
        long = async_engine.generate(GenerateRequest("peak-long", tuple(prompts[0]), greedy(200)))
        short = async_engine.generate(GenerateRequest("peak-short", tuple(prompts[1]), greedy(3)))
        await long.__anext__()
        await short.__anext__()
        during = sorted(async_engine.peak_tokens())
        async for _ in short:  # runs to its end
            pass
        after_short = async_engine.peak_tokens()
        await long.aclose()
        return during, after_short, async_engine.peak_tokens()

    during, after_short, after_all = asyncio.run(main())
    assert during == sorted([len(prompts[1]) + 3, len(prompts[0]) + 200])
    assert after_short == [len(prompts[0]) + 200] and after_all == []
    assert heard == [[len(prompts[0]) + 200], during]
    async_engine._arrival_listeners.clear()  # the engine is the module's
    asyncio.run(wait_for_stats(async_engine, idle))


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
        # the first token's queue and prefill times survive the merge, whichever output carried them
        timed = dataclasses.replace(output((1,), "a", 1), queue_time_s=0.25, prefill_time_s=0.5)
        for first, later in ((timed, output((2,), "b", 2)), (output((0,), "", 0), timed)):
            stream = asyncio.Queue()
            stream.put_nowait(later)
            merged, _ = _coalesce(first, stream)
            assert (merged.queue_time_s, merged.prefill_time_s) == (0.25, 0.5)

    asyncio.run(main())


# ---- stream pacing ---------------------------------------------------------------------------------------
PACED_STREAMS = 8
PACED_TOKENS = 96


def pacing_engine(model_dir, tokenizer, chunks_per_s: float | None) -> LLMEngine:
    """The tiny model: steps of a few ms, far shorter than the pacing interval."""
    return tiny_engine(model_dir, tokenizer, max_num_seqs=PACED_STREAMS, max_num_batched_tokens=256,
                       stream_chunks_per_s=chunks_per_s)


def pause_before_each_step(engine: LLMEngine, seconds: float) -> None:
    """The engine thread sleeps (the GIL released) before each step, so every consumer has read the last
    step's outputs before the next one comes: an unpaced stream then gets exactly one chunk per step."""
    step = engine.step

    def paused_step():
        time.sleep(seconds)
        return step()

    engine.step = paused_step


def stream_all(engine: LLMEngine, prompts, params) -> list[list[tuple[float, RequestOutput]]]:
    """Every prompt at once through an AsyncEngine around `engine` (shut down after, which closes the engine);
    each stream's (loop time it was read, output) list."""

    async def main():
        async_engine = AsyncEngine(engine)
        await async_engine.start()
        loop = asyncio.get_running_loop()

        async def one(index):
            request = GenerateRequest(f"paced{index}", tuple(prompts[index]), params)
            return [(loop.time(), output) async for output in async_engine.generate(request)]

        try:
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(len(prompts)))), timeout=120)
        finally:
            await async_engine.shutdown()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def pacing_prompts(smollm2_tokenizer):
    return [list(smollm2_tokenizer(text).input_ids) for text in PROMPTS[:PACED_STREAMS]]


@pytest.fixture(scope="module")
def unpaced_run(tiny_llama_dir, smollm2_tokenizer, pacing_prompts):
    """The streams with pacing off (stream_chunks_per_s None), each consumer keeping up."""
    engine = pacing_engine(tiny_llama_dir, smollm2_tokenizer, None)
    pause_before_each_step(engine, 0.01)
    return stream_all(engine, pacing_prompts, greedy(PACED_TOKENS, logprobs=1))


def test_unpaced_streams_get_one_chunk_per_token(unpaced_run):
    for index, read in enumerate(unpaced_run):
        outputs = [output for _, output in read]
        assert [len(output.new_token_ids) for output in outputs] == [1] * PACED_TOKENS, f"stream {index}"
        assert outputs[-1].finish_reason == "length"


def test_many_paced_streams_get_few_chunks_with_the_unpaced_runs_tokens(tiny_llama_dir, smollm2_tokenizer,
                                                                         pacing_prompts, unpaced_run):
    chunks_per_s = 40.0  # 8 streams: a chunk every 0.2 s at most per stream
    engine = pacing_engine(tiny_llama_dir, smollm2_tokenizer, chunks_per_s)
    pause_before_each_step(engine, 0.005)  # the run spans several intervals
    paced_run = stream_all(engine, pacing_prompts, greedy(PACED_TOKENS, logprobs=1))
    interval = pace_interval(PACED_STREAMS, chunks_per_s)
    for index, (read, unpaced) in enumerate(zip(paced_run, unpaced_run, strict=True)):
        outputs = [output for _, output in read]
        plain = [output for _, output in unpaced]
        # the same tokens, text and logprobs, grouped into few chunks
        for field in ("new_token_ids", "logprobs"):
            assert [x for output in outputs for x in getattr(output, field)] == \
                [x for output in plain for x in getattr(output, field)], f"stream {index}: {field}"
        assert "".join(output.text_delta for output in outputs) == "".join(output.text_delta for output in plain)
        assert len(outputs) <= PACED_TOKENS // 8, f"stream {index}: {len(outputs)} chunks"
        assert len(outputs[0].new_token_ids) == 1  # the first token went out at once (TTFT is never held)
        assert [output.finish_reason for output in outputs] == [None] * (len(outputs) - 1) + ["length"]
        assert outputs[-1].num_output_tokens == PACED_TOKENS
        # between two deliveries at least the interval (the last, finishing, one is never held)
        times = [at for at, _ in read]
        gaps = [later - earlier for earlier, later in zip(times[:-2], times[1:-1], strict=True)]
        assert all(gap >= interval - 0.03 for gap in gaps), (index, gaps)


def test_an_error_mid_stream_comes_after_the_tokens_held_for_it(tiny_llama_dir, smollm2_tokenizer, prompts):
    # one stream at 1 chunk a second: each output after the first is held up to 0.25 s (MAX_INTERVAL_S)
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer, stream_chunks_per_s=1.0)  # shutdown closes it
    fault = Fault(engine.scheduler)

    async def main():
        async_engine = AsyncEngine(engine)
        await async_engine.start()
        outputs = []
        try:
            async for output in async_engine.generate(GenerateRequest("failing", tuple(prompts[0]), greedy(200))):
                outputs.append(output)
                if len(outputs) == 1:  # a few steps' tokens wait behind the first, then every step fails
                    steps = engine.num_steps
                    while engine.num_steps < steps + 3:
                        await asyncio.sleep(0.001)
                    fault.on = True
            return outputs
        finally:
            await async_engine.shutdown()

    outputs = asyncio.run(asyncio.wait_for(main(), timeout=60))
    first, held, error = outputs  # the failure did not wait for the interval, and the held tokens came first
    assert len(first.new_token_ids) == 1 and first.finish_reason is None
    assert len(held.new_token_ids) >= 3 and held.finish_reason is None
    assert error.finish_reason == "error" and "scheduler bug" in error.error and error.new_token_ids == ()
    assert len(first.new_token_ids) + len(held.new_token_ids) == error.num_output_tokens  # none lost


def test_paced_stream_merges_until_the_interval_and_never_holds_endings():
    def output(tokens, finish=None):
        return RequestOutput("r", tokens, "".join(map(str, tokens)), finish_reason=finish, num_output_tokens=tokens[-1]
                             if tokens else 0)

    async def main():
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        paced = PacedStream(loop, queue, 10.0, lambda: 2)  # 2 streams at 10 chunks/s: 0.2 s apart
        paced.put(output((1,)))
        paced.put(output((2,)))
        paced.put(output((3,)))
        assert [queue.get_nowait()] == [output((1,))] and queue.empty()  # the first at once, the rest held
        await asyncio.sleep(0.3)
        assert queue.get_nowait() == output((2, 3)) and queue.empty()
        paced.put(output((4,)))
        failure = RuntimeError("loop died")
        paced.put(failure)  # not held, and after the held token
        assert [queue.get_nowait(), queue.get_nowait()] == [output((4,)), failure]
        paced.put(output((5,)))
        paced.put(output((6,), "length"))  # a finishing output is never held: it takes the pending along
        assert queue.get_nowait() == output((5, 6), "length") and queue.empty()
        paced.put(output((7,)))
        paced.close()  # the consumer left: the timer goes, nothing more is delivered
        await asyncio.sleep(0.3)
        assert queue.empty()
        unpaced = PacedStream(loop, queue, None, lambda: 100)
        for tokens in ((1,), (2,), (3,)):
            unpaced.put(output(tokens))
        assert [queue.get_nowait() for _ in range(3)] == [output((1,)), output((2,)), output((3,))]

    asyncio.run(main())


def test_the_engine_thread_takes_its_nice_value_and_survives_a_refusal(monkeypatch):
    """`set_thread_nice` sets the calling thread's nice (raising it needs no privilege, so this runs
    anywhere) and leaves other threads alone; a refused value is a warning and False, never an exception
    (the loop keeps running at its inherited value); None does nothing. The config refuses values outside
    [-20, 19]."""
    import os
    import threading

    from engine.async_engine import set_thread_nice

    def in_thread(function):
        result = []
        thread = threading.Thread(target=lambda: result.append(function()))
        thread.start()
        thread.join()
        return result[0]

    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    target = min(before + 3, 19)
    assert in_thread(lambda: (set_thread_nice(target), os.getpriority(os.PRIO_PROCESS, 0))[1]) == target
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # only that thread

    def refuse(*args):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "setpriority", refuse)
    assert in_thread(lambda: set_thread_nice(-10)) is False
    assert set_thread_nice(None) is True
    for bad in (-21, 20, 1.5, True):
        with pytest.raises(ValueError, match="engine_thread_nice"):
            EngineConfig(dtype="float32", engine_thread_nice=bad)


def test_an_ended_stream_gives_its_id_back_before_its_consumer_leaves(tiny_llama_dir, smollm2_tokenizer):
    """A stream whose last output was put (a request handed off to another replica, whose consumer went on with the
    relay) is replaced when the same id comes back (migrated back) before that consumer leaves its generator; the
    old generator's end then leaves the new stream registered. A stream still running is never taken over."""
    engine = AsyncEngine(tiny_engine(tiny_llama_dir, smollm2_tokenizer))

    async def main():
        await engine.start()
        try:
            old = engine._open_stream("x")
            with pytest.raises(InvalidRequestError, match="already running"):
                engine._open_stream("x")
            engine._streams["x"].put(RequestOutput("x", (1,), "a", finish_reason="handed_off"))
            old_reader = engine._stream("x", old, lambda: asyncio.sleep(0))
            assert (await old_reader.__anext__()).finish_reason == "handed_off"  # the consumer has not left yet
            new = engine._open_stream("x")
            await old_reader.aclose()  # the old consumer leaves now
            assert engine._streams["x"].queue is new
            await engine._stream("x", new, lambda: asyncio.sleep(0)).aclose()
            # an ended stream whose consumer leaves without reading its last output, after the id came back:
            # the run the id names now is the new one's, which the old consumer must not abort
            first = engine._open_stream("y")
            engine._streams["y"].put(RequestOutput("y", (1,), "a"))
            first_reader = engine._stream("y", first, lambda: asyncio.sleep(0))
            await first_reader.__anext__()
            engine._streams["y"].put(RequestOutput("y", (2,), "b", finish_reason="handed_off"))
            second = engine._open_stream("y")
            sent = []
            engine._inbox.put, put = sent.append, engine._inbox.put
            await first_reader.aclose()
            engine._inbox.put = put
            assert ("abort", "y") not in sent and engine._streams["y"].queue is second
            await engine._stream("y", second, lambda: asyncio.sleep(0)).aclose()
        finally:
            await engine.shutdown()

    asyncio.run(main())
