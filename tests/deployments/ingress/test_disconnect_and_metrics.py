"""Client disconnects abort the engine request; /metrics counts what was served."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.openai_app import AppSettings, build_openai_app
from tests.deployments.asgi_call import AsgiCall
from tests.deployments.fake_engine import FakeEngine

LABELS = {"model_name": "fake-model", "replica": "r1"}


def make_app(engine: FakeEngine):
    return build_openai_app(lambda: engine, AppSettings(bindings=EngineBindings.from_engine_package(),
                                                        replica_id="r1"))


@pytest.mark.anyio
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/completions", {"prompt": "Hi", "n": 2}),
])
async def test_disconnect_mid_stream_aborts_the_engine_requests(path, body):
    engine = FakeEngine(token_delay_s=0.01)
    app = make_app(engine)
    call = AsgiCall(app, path, {**body, "max_tokens": 200, "stream": True}, disconnect_after_chunks=3)
    await asyncio.wait_for(call.run(), timeout=10)
    assert call.status == 200
    request_ids = [request.request_id for request in engine.submitted]
    assert len(request_ids) == body.get("n", 1)
    assert sorted(engine.aborted) == sorted(request_ids)
    assert all(engine.finished[request_id] == "abort" for request_id in request_ids)
    assert engine.num_live() == 0 and engine.kv_chunks_used() == 0
    metrics = scrape(app)
    assert metrics[("elastic:request_success_total", (("finished_reason", "abort"),))] == len(request_ids)


@pytest.mark.anyio
async def test_cancelled_non_stream_request_aborts_the_engine_request():
    engine = FakeEngine(token_delay_s=0.01)
    call = AsgiCall(make_app(engine), "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200})
    task = asyncio.ensure_future(call.run())
    while not engine.submitted or engine.num_live() == 0:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [request] = engine.submitted
    assert engine.aborted == [request.request_id]
    assert engine.num_live() == 0


def scrape(app) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, labels other than model_name/replica): value}."""
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            assert {key: sample.labels[key] for key in LABELS} == LABELS, sample
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in LABELS))
            samples[(sample.name, labels)] = sample.value
    return samples


def test_metrics_count_requests_tokens_and_latencies(engine):
    from fastapi.testclient import TestClient

    app = make_app(engine)
    with TestClient(app) as client:
        prompts = ["Hello", "Hi", "Hey there"]
        for prompt in prompts:
            assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4}).status_code == 200
        streamed = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True})
        assert streamed.status_code == 200
        assert client.post("/v1/completions", json={"prompt": "EOS", "max_tokens": 9}).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "x", "model": "nope"}).status_code == 404
        assert client.post("/v1/completions", json={"prompt": ""}).status_code == 400
    num_prompt_tokens = sum(len(request.prompt_token_ids) for request in engine.submitted)
    metrics = scrape(app)
    assert metrics[("elastic:request_success_total", (("finished_reason", "length"),))] == 4
    assert metrics[("elastic:request_success_total", (("finished_reason", "stop"),))] == 1
    assert metrics[("elastic:prompt_tokens_total", ())] == num_prompt_tokens
    assert metrics[("elastic:generation_tokens_total", ())] == 3 * 4 + 3 + 4
    assert metrics[("elastic:time_to_first_token_seconds_count", ())] == 5
    # the engine's split of each first token's time (the fake engine reports 0.25 s queued, 0.5 s prefilling)
    assert metrics[("elastic:request_queue_time_seconds_count", ())] == 5
    assert metrics[("elastic:request_queue_time_seconds_sum", ())] == 5 * 0.25
    assert metrics[("elastic:request_prefill_time_seconds_sum", ())] == 5 * 0.5
    assert metrics[("elastic:e2e_request_latency_seconds_count", ())] == 5
    assert metrics[("elastic:inter_token_latency_seconds_count", ())] == 3 * 3 + 2 + 3
    assert metrics[("elastic:http_request_errors_total", (("status", "404"),))] == 1
    assert metrics[("elastic:http_request_errors_total", (("status", "400"),))] == 1
    # Engine and pool state, read at scrape time.
    assert metrics[("elastic:num_requests_running", ())] == 0
    assert metrics[("elastic:num_requests_waiting", ())] == 0
    assert metrics[("elastic:num_requests_swapped", ())] == 0
    assert metrics[("elastic:kv_cache_usage_perc", ())] == 0
    assert metrics[("elastic:num_preemptions_total", ())] == 0
    assert metrics[("elastic:prefix_cache_queries_total", ())] == num_prompt_tokens
    assert metrics[("elastic:pool_chunks", (("client", "kv"), ("rank", "0")))] == 0
    assert metrics[("elastic:pool_chunks", (("client", "activations"), ("rank", "0")))] == 2
    assert metrics[("elastic:pool_chunks", (("client", "free"), ("rank", "0")))] == 64
    assert metrics[("elastic:pool_inflate_total", (("rank", "0"),))] > 0
    assert metrics[("elastic:pool_bytes_swapped_total", (("direction", "out"), ("rank", "0")))] == 0
    assert metrics[("elastic:pool_host_buffer_bytes", (("rank", "0"),))] == 0
    assert metrics[("elastic:weights_dropped_bytes", ())] == 0
    assert metrics[("elastic:pipeline_bubble_ratio", ())] == 0
    assert [metrics[("elastic:parameter_drop_state", (("state", name),))]
            for name in ("normal", "dropping", "dropped", "restoring")] == [1, 0, 0, 0]


@pytest.mark.anyio
async def test_running_gauges_follow_live_requests():
    engine = FakeEngine(token_delay_s=0.01, kv_total_chunks=10, tokens_per_chunk=4)
    app = make_app(engine)
    calls = [AsgiCall(app, "/v1/completions", {"prompt": f"p{i}", "max_tokens": 30, "stream": True})
             for i in range(2)]
    tasks = [asyncio.ensure_future(call.run()) for call in calls]
    while engine.num_live() < 2:
        await asyncio.sleep(0.005)
    stats = engine.stats()
    collector_view = {}
    for family in app.state.metrics.registry.collect():
        for sample in family.samples:
            collector_view[sample.name] = sample.value
    assert collector_view["elastic:num_requests_running"] == 2
    assert 0 < collector_view["elastic:kv_cache_usage_perc"] <= 1
    assert stats.num_running == 2
    for call in calls:
        call.disconnected.set()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)
    assert engine.num_live() == 0
