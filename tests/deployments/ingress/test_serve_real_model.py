"""Real Ray Serve on 127.0.0.1, two LLMServer replicas with the real engine and the embedded SmolLM2:
the issue's end-to-end tests. Greedy text through HTTP must equal the engine's own, run in this process
before Ray starts. The pool is kept small (640 MiB, fp32) so one long prompt visibly changes a replica's
KV headroom; prefix caching is off so the KV balloon must return exactly to its idle size."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from deployments.args import AppArgs
from deployments.ingress.openai_app import REPLICA_HEADER
from tests.deployments.ray_cluster import LocalRayCluster
from tests.deployments.serve_helpers import (
    cluster_view,
    metric_totals,
    metrics_by_replica,
    wait_for,
    wait_for_fresh_replicas,
)

pytestmark = pytest.mark.timeout(420)
CONTROLLER = "real-model-test-controller"
ARGS = {"device": "cpu", "dtype": "float32", "device_memory": "640MiB", "host_buffer": "256MiB",
        "enable_prefix_caching": False, "controller_name": CONTROLLER}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The three primary colors are"
NUM_TOKENS = 16


async def _engine_greedy(engine, prompt_ids, max_tokens: int) -> str:
    from engine.api import GenerateRequest
    from engine.sampling_params import SamplingParams

    text = ""
    request = GenerateRequest(f"ref-{len(prompt_ids)}-{max_tokens}", tuple(prompt_ids),
                              SamplingParams(temperature=0, max_tokens=max_tokens))
    async for output in engine.generate(request):
        text += output.text_delta
    return text


def reference_texts() -> dict[str, str]:
    """Greedy outputs of the engine itself, with the replicas' configuration."""
    from engine.async_engine import AsyncEngine
    from engine.text.tokenizer import encode_chat, encode_prompt

    async def run():
        engine = AsyncEngine.from_config(AppArgs.model_validate(ARGS).to_engine_config())
        await engine.start()
        try:
            return {
                "chat": await _engine_greedy(engine, encode_chat(engine.tokenizer, CHAT), NUM_TOKENS),
                "completion": await _engine_greedy(engine, encode_prompt(engine.tokenizer, PROMPT), NUM_TOKENS),
                "model": engine.model_name,
            }
        finally:
            await engine.shutdown()

    return asyncio.run(run())


@pytest.fixture(scope="module")
def reference():
    return reference_texts()


@pytest.fixture(scope="module")
def cluster(reference):
    from ray import serve

    from deployments.app import build_app

    cluster = LocalRayCluster()
    try:
        cluster.start()
        serve.run(build_app({**ARGS, "deployment_options": {"num_replicas": 2}}), name="llm", route_prefix="/")
        wait_for_fresh_replicas(cluster.base_url, 2)
        cluster.remember_processes()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def kv_chunks(view: dict) -> dict[str, int]:
    return {replica: entry["pools"][0]["chunks_per_client"].get("kv", 0)
            for replica, entry in view["replicas"].items()}


def is_idle(base_url: str, idle_kv: dict[str, int] | None = None) -> bool:
    view = cluster_view(base_url)
    for replica, entry in view["replicas"].items():
        stats = entry["stats"]
        if entry["is_stale"] or stats["num_running"] or stats["num_waiting"] or stats["kv_chunks_used"]:
            return False
        if idle_kv is not None and kv_chunks(view)[replica] != idle_kv.get(replica, 0):
            return False
    return True


def test_openai_client_gets_the_engines_greedy_text(client, reference):
    model = reference["model"]
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=NUM_TOKENS, temperature=0)
    assert chat.choices[0].message.content == reference["chat"]
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=NUM_TOKENS,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference["chat"]
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    completion = client.completions.create(model=model, prompt=PROMPT, max_tokens=NUM_TOKENS, temperature=0)
    assert completion.choices[0].text == reference["completion"]
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=NUM_TOKENS,
                                              temperature=0, stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == reference["completion"]


def test_sixteen_concurrent_streams_metrics_and_kv_back_to_idle(cluster, reference):
    base = cluster.base_url
    wait_for(lambda: is_idle(base), "idle replicas")
    idle_kv = kv_chunks(cluster_view(base))
    before = metric_totals(base, 2)

    async def one(client: openai.AsyncOpenAI) -> tuple[str, str, int]:
        stream = await client.chat.completions.create(
            model=reference["model"], messages=CHAT, max_tokens=NUM_TOKENS, temperature=0, stream=True,
            stream_options={"include_usage": True})
        text, finish_reason, usage = "", None, None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish_reason = chunk.choices[0].finish_reason or finish_reason
            usage = chunk.usage or usage
        return text, finish_reason, usage.completion_tokens

    async def all_streams():
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client) for _ in range(16)))

    results = asyncio.run(all_streams())
    assert [text for text, _, _ in results] == [reference["chat"]] * 16
    assert all(finish_reason in ("stop", "length") for _, finish_reason, _ in results)
    after = metric_totals(base, 2)

    def delta(name, labels=()):
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    finished = sum(delta("elastic:request_success_total", (("finished_reason", reason),))
                   for reason in ("stop", "length"))
    assert finished == 16
    assert delta("elastic:generation_tokens_total") == sum(tokens for _, _, tokens in results)
    assert delta("elastic:time_to_first_token_seconds_count") == 16
    assert delta("elastic:e2e_request_latency_seconds_count") == 16
    # The KV balloon gives back every chunk the 16 requests took.
    wait_for(lambda: is_idle(base, idle_kv), "the KV balloons back to their idle size")


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(cluster, client, reference):
    base = cluster.base_url
    malformed = httpx.post(f"{base}/v1/completions", content=b'{"prompt": ',
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400
    assert set(malformed.json()["error"]) == {"message", "type", "param", "code"}
    schema = httpx.post(f"{base}/v1/chat/completions", json={"model": reference["model"], "messages": "hi"})
    assert schema.status_code == 400 and schema.json()["error"]["param"] == "messages"
    with pytest.raises(openai.NotFoundError) as not_found:
        client.completions.create(model="gpt-17", prompt="x")
    assert not_found.value.body == {"message": "The model `gpt-17` does not exist.",
                                    "type": "invalid_request_error", "param": "model", "code": "model_not_found"}
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model=reference["model"], prompt="hello " * 8200, max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad_value:
        client.chat.completions.create(model=reference["model"], messages=CHAT, top_p=0)
    assert bad_value.value.body["param"] == "top_p"
    again = client.completions.create(model=reference["model"], prompt=PROMPT, max_tokens=NUM_TOKENS,
                                      temperature=0)
    assert again.choices[0].text == reference["completion"]


def test_disconnect_mid_stream_frees_the_requests_kv(cluster, reference):
    base = cluster.base_url
    wait_for(lambda: is_idle(base), "idle replicas")
    idle_kv = kv_chunks(cluster_view(base))
    with httpx.stream("POST", f"{base}/v1/completions", timeout=120, json={
            "model": reference["model"], "prompt": "Tell me a long story. " * 20, "max_tokens": 2000,
            "ignore_eos": True, "stream": True}) as response:
        replica = response.headers[REPLICA_HEADER]
        lines = response.iter_lines()
        for _ in range(4):
            assert next(lines).startswith("data: ")
            next(lines)
        wait_for(lambda: cluster_view(base)["replicas"][replica]["stats"]["kv_chunks_used"] > 0,
                 "the stream's KV in the cluster view")
    wait_for(lambda: is_idle(base, idle_kv), "the aborted request's KV given back")


def test_router_sends_new_requests_to_the_replica_with_more_kv_headroom(cluster, reference):
    """Replica L holds one long prompt (~40% of its KV room); R then gets two short requests. New
    requests go to R, by headroom, although R's queue is longer."""
    base = cluster.base_url
    wait_for(lambda: is_idle(base), "idle replicas")
    before = metrics_by_replica(base, 2)
    body = {"model": reference["model"], "max_tokens": 300, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as http:
        streams = []
        try:
            big = http.stream("POST", f"{base}/v1/completions", json={**body, "prompt": "Once upon a time " * 240})
            streams.append(big)
            response = big.__enter__()
            assert response.status_code == 200, response.read()
            loaded = response.headers[REPLICA_HEADER]
            time.sleep(1.2)  # the router's copy of the stats comes through Serve every 0.5 s
            placed = []
            for index in range(2):
                small = http.stream("POST", f"{base}/v1/completions", json={**body, "prompt": f"Hi {index}"})
                streams.append(small)
                response = small.__enter__()
                assert response.status_code == 200, response.read()
                placed.append(response.headers[REPLICA_HEADER])
            assert loaded not in placed and placed[0] == placed[1], (loaded, placed)
            time.sleep(1.2)
            probes = [http.post(f"{base}/v1/completions", json={"model": reference["model"], "prompt": "Hi",
                                                                 "max_tokens": 2}) for _ in range(4)]
            assert [probe.headers[REPLICA_HEADER] for probe in probes] == [placed[0]] * 4
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)
    wait_for(lambda: is_idle(base), "idle replicas after the router test")
    # Per-replica counters agree: L finished its one request (aborted at the end), R the 2 + 4 others.
    after = metrics_by_replica(base, 2)
    key = ("elastic:e2e_request_latency_seconds_count", ())
    finished = {replica: after[replica].get(key, 0) - before[replica].get(key, 0) for replica in after}
    assert finished == {loaded: 1, placed[0]: 6}


def test_shutdown_leaves_no_processes(cluster):
    from deployments.cluster.controller import stop_controller

    assert stop_controller(CONTROLLER, "elastic-serve")
    cluster.stop()
    assert cluster.leftover_processes() == []
