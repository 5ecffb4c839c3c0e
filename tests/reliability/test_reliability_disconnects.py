"""A storm of client disconnects at random points leaves nothing running and no KV held; overload is a
503 with Retry-After and the server recovers. In-process, around the fake engine (whose KV accounting is
exact); the Ray-level versions are in test_reliability_serve.py."""

from __future__ import annotations

import asyncio
import random

import httpx

from tests.deployments.asgi_call import AsgiCall
from tests.deployments.fake_engine import FakeEngine
from tests.reliability.conftest import assert_openai_error, make_app

CHAT = {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 30, "stream": True}
COMPLETION = {"prompt": "Once upon a time", "max_tokens": 30, "n": 2, "stream": True}


def test_sixty_disconnects_at_random_points_leave_the_engine_idle():
    engine = FakeEngine(token_delay_s=0.002, max_model_len=1024, max_num_seqs=64, max_num_waiting=512,
                        kv_total_chunks=4096)
    app = make_app(engine)
    rng = random.Random(15)

    async def one(index: int) -> AsgiCall:
        body = CHAT if index % 2 else COMPLETION
        if index % 3 == 0:
            body = {key: value for key, value in body.items() if key != "stream"}  # non-streaming too
        request = AsgiCall(app, "/v1/chat/completions" if index % 2 else "/v1/completions", body)
        task = asyncio.create_task(request.run())
        await asyncio.sleep(rng.uniform(0.0, 0.08))  # before headers, in the queue, or mid-stream
        request.disconnect()
        await asyncio.wait_for(task, 10)
        return request

    async def storm():
        requests = await asyncio.gather(*(one(index) for index in range(60)))
        await asyncio.sleep(0.05)
        return requests

    requests = asyncio.run(storm())
    assert engine.num_live() == 0
    assert engine.kv_chunks_used() == 0
    assert engine.stats().num_running == 0 and engine.stats().num_waiting == 0
    assert app.state.serving.num_runs == 0
    started = [request_id for request_id in engine.finished]
    assert len(started) == len(engine.submitted) > 0
    # Every engine request either finished on its own or was aborted by the disconnect.
    assert set(engine.finished.values()) <= {"abort", "length"}
    assert sum(1 for reason in engine.finished.values() if reason == "abort") == len(engine.aborted) > 0
    assert all(request.status in (None, 200) for request in requests)


def test_overload_is_503_with_retry_after_then_recovery():
    engine = FakeEngine(token_delay_s=0.01, max_model_len=1024, max_num_seqs=1, max_num_waiting=1)
    app = make_app(engine)

    async def scenario():
        first = AsgiCall(app, "/v1/completions", {"prompt": "a", "max_tokens": 30, "stream": True})
        second = AsgiCall(app, "/v1/completions", {"prompt": "b", "max_tokens": 30, "stream": True})
        tasks = [asyncio.create_task(first.run()), asyncio.create_task(second.run())]
        while engine.num_live() < 2:
            await asyncio.sleep(0.005)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            refused = await client.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
            await asyncio.gather(*tasks)
            recovered = await client.post("/v1/completions", json={"prompt": "c", "max_tokens": 2})
            metrics = (await client.get("/metrics")).text
        return refused, recovered, first, second, metrics

    refused, recovered, first, second, metrics = asyncio.run(scenario())
    assert_openai_error(refused, 503, None, "overloaded")
    assert refused.headers["retry-after"] == "2"
    assert first.events[-1] == second.events[-1] == "[DONE]"
    assert recovered.status_code == 200
    assert 'elastic:http_request_errors_total{model_name="fake-model",replica="replica-under-test",status="503"} 1.0' \
        in metrics
