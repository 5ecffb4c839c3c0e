"""Every stream ends with an error event and `[DONE]` when the server ends it; requests the server ends
before answering get a retryable 503. (Issue 15, failures 4 and 5, the replica side.)"""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.deployments.asgi_call import AsgiCall
from tests.deployments.conftest import sse_events
from tests.deployments.fake_engine import FakeEngine
from tests.reliability.conftest import assert_openai_error, make_app

STREAM = {"prompt": "Hello", "max_tokens": 200, "stream": True}


def _assert_ends_with_error(events: list[str], code: str) -> dict:
    assert events[-1] == "[DONE]", events[-3:]
    error = json.loads(events[-2])["error"]
    assert (error["type"], error["code"]) == ("server_error", code)
    assert all("error" not in json.loads(event) for event in events[:-2])
    return error


def test_drain_refuses_new_requests_and_aborts_running_streams_cleanly():
    engine = FakeEngine(token_delay_s=0.01, max_model_len=1024)
    app = make_app(engine)
    serving = app.state.serving

    async def scenario():
        streams = [AsgiCall(app, "/v1/completions", STREAM) for _ in range(3)]
        tasks = [asyncio.create_task(stream.run()) for stream in streams]
        while serving.num_runs < 3 or any(len(stream.events) < 2 for stream in streams):
            await asyncio.sleep(0.01)
        serving.is_draining = True
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            refused = await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 2})
            health = await client.get("/health")
        await serving.abort_all()
        await asyncio.gather(*tasks)
        return streams, refused, health

    streams, refused, health = asyncio.run(scenario())
    assert_openai_error(refused, 503, None, "shutting_down")
    assert refused.headers["retry-after"] == "1"
    assert health.status_code == 503 and health.json() == {"status": "draining"}
    for stream in streams:
        assert stream.is_complete
        _assert_ends_with_error(stream.events, "aborted")
    assert serving.num_runs == 0 and engine.num_live() == 0
    assert len(engine.submitted) == 3


def test_a_non_streaming_request_aborted_by_the_server_is_a_retryable_503():
    engine = FakeEngine(token_delay_s=0.01, max_model_len=1024)
    app = make_app(engine)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client:
            task = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 200}))
            while app.state.serving.num_runs == 0:
                await asyncio.sleep(0.01)
            await app.state.serving.abort_all()
            return await task

    response = asyncio.run(scenario())
    assert_openai_error(response, 503, None, "aborted")
    assert response.headers["retry-after"] == "1"


def test_an_engine_dying_mid_stream_ends_it_with_an_error_event_and_done():
    engine = FakeEngine(token_delay_s=0.01, max_model_len=1024)

    async def scenario():
        app = make_app(engine)
        stream = AsgiCall(app, "/v1/completions", STREAM)
        task = asyncio.create_task(stream.run())
        while len(stream.events) < 2:
            await asyncio.sleep(0.01)
        engine.die("loop died")  # what AsyncEngine's loop does when it breaks: every stream hears it
        await task
        return stream.events

    events = asyncio.run(scenario())
    error = _assert_ends_with_error(events, "engine_dead")
    assert "loop died" not in error["message"] and "trace id" in error["message"]


def test_an_engine_failure_mid_chat_stream_ends_with_error_then_done():
    engine = FakeEngine()
    app = make_app(engine)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "FAIL"}], "max_tokens": 8, "stream": True})

    response = asyncio.run(scenario())
    events = sse_events(response.text)
    _assert_ends_with_error(events, "internal_error")


def test_a_run_aborted_before_its_request_reaches_the_engine_still_ends_aborted():
    """abort_all can land between a run's registration and its request's first step into the engine (the
    engine then knows no such request): the run aborts it as soon as its first output arrives."""
    from deployments.ingress.generation import GenerationRun
    from deployments.ingress.metrics import ServingMetrics
    from engine.api import GenerateRequest
    from engine.sampling_params import SamplingParams

    engine = FakeEngine(token_delay_s=0.01, max_model_len=1024)
    request = GenerateRequest("late-0", (1, 2), SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))

    async def scenario():
        run = GenerationRun(engine, [request], ServingMetrics(lambda: engine, "fake-model", "r"))
        await run.abort()  # before start(): the engine has not seen the request
        await run.start()
        return [output async for _, output in run.outputs()]

    outputs = asyncio.run(scenario())
    assert outputs[-1].finish_reason == "abort"
    assert sum(len(output.new_token_ids) for output in outputs) < 200
