"""One huge request never delays health checks or other requests: tokenising runs in a thread pool.
(Issue 15, failure 3.) The real SmolLM2 tokenizer: a ~1.5 MB prompt takes it seconds."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from engine.text.tokenizer import load_tokenizer
from tests.deployments.fake_engine import FakeEngine
from tests.reliability.conftest import assert_openai_error, make_app


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


@pytest.fixture(scope="module")
def huge_prompt(tokenizer):
    return "The quick brown fox jumps over the lazy dog. " * 35_000  # 1.6 MB


def test_a_huge_prompt_in_flight_does_not_delay_small_requests_or_health(tokenizer, huge_prompt):
    # A context long enough that the prompt passes the length pre-check and really gets tokenised.
    engine = FakeEngine(tokenizer=tokenizer, max_model_len=1_000_000, token_delay_s=0.0)
    app = make_app(engine, max_body_bytes=8 << 20)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            started = time.monotonic()
            huge = asyncio.create_task(client.post("/v1/completions", json={"prompt": huge_prompt,
                                                                           "max_tokens": 1}))
            await asyncio.sleep(0.3)  # the huge prompt is being tokenised now
            health = await client.get("/health")
            small = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            answered_s = time.monotonic() - started  # both answers, counted from the huge request's start
            huge_was_running = not huge.done()
            huge_response = await huge
            return health, small, answered_s, huge_was_running, huge_response, time.monotonic() - started

    health, small, answered_s, huge_was_running, huge_response, huge_s = asyncio.run(scenario())
    assert health.status_code == 200 and small.status_code == 200
    # With tokenising on the event loop, the 0.3 s sleep alone lasts until the huge prompt is tokenised.
    assert answered_s < 1.5, f"/health and a 2-token request answered {answered_s:.2f} s after the huge prompt"
    assert huge_was_running, f"the huge prompt finished in {huge_s:.1f} s: too short to show anything"
    assert huge_response.status_code == 200
    small_request, huge_request = engine.submitted  # the small one reached the engine first
    assert small_request.prompt_token_ids == tuple(tokenizer.encode("Hi"))
    assert huge_request.prompt_token_ids[:8] == tuple(tokenizer.encode(huge_prompt[:100])[:8])


def test_a_prompt_too_long_for_the_context_is_refused_in_milliseconds(tokenizer, huge_prompt):
    engine = FakeEngine(tokenizer=tokenizer, max_model_len=8192)
    app = make_app(engine, max_body_bytes=8 << 20)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            await client.post("/v1/completions", json={"prompt": "warm up", "max_tokens": 1})
            started = time.monotonic()
            response = await client.post("/v1/completions", json={"prompt": huge_prompt})
            return response, time.monotonic() - started

    response, elapsed_s = asyncio.run(scenario())
    assert_openai_error(response, 400, "prompt", "context_length_exceeded")
    assert elapsed_s < 1.0
