"""Real Ray Serve on 127.0.0.1, two LLMServer replicas around the fake engine (injected through
AppArgs.engine_factory): the official openai client, concurrency, errors, disconnects, the KV-headroom
router, the cluster controller, and a clean shutdown. The fake makes KV use predictable, which the router
test needs; test_serve_real_model.py runs the same paths with the real model."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from deployments.ingress.openai_app import REPLICA_HEADER
from engine.text.tokenizer import encode_chat, encode_prompt
from tests.deployments.fake_engine import FakeEngine, FakeTokenizer
from tests.deployments.ray_cluster import LocalRayCluster
from tests.deployments.serve_helpers import (
    cluster_view,
    metric_totals,
    wait_for,
    wait_for_fresh_replicas,
)

pytestmark = pytest.mark.timeout(300)
CONTROLLER = "fake-test-controller"
TP_CONTROLLER = "fake-tp-test-controller"
FAKE_OPTIONS = {"token_delay_s": 0.01, "max_model_len": 2048, "kv_total_chunks": 64, "tokens_per_chunk": 16}
TOKENIZER = FakeTokenizer()
REFERENCE = FakeEngine()


def expected_text(prompt_ids, num_tokens: int) -> str:
    return TOKENIZER.decode(REFERENCE.output_ids(prompt_ids, num_tokens))


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    from deployments.app import build_app

    cluster = LocalRayCluster()
    try:
        cluster.start()
        # Half a CPU per rank: two replicas here and a TP=2 replica (two bundles) in the app below fit 2 CPUs.
        app = build_app({"engine_factory": "tests.deployments.fake_engine:create_fake_engine",
                         "engine_factory_kwargs": FAKE_OPTIONS, "controller_name": CONTROLLER,
                         "cpus_per_rank": 0.5,
                         "deployment_options": {"num_replicas": 2, "max_ongoing_requests": 32}})
        serve.run(app, name="fake-llm", route_prefix="/")
        wait_for_fresh_replicas(cluster.base_url, 2)
        cluster.remember_processes()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def client(cluster):
    return openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0)


def test_openai_client_chat_and_completions(client):
    messages = [{"role": "user", "content": "What is up?"}]
    chat_ids = encode_chat(TOKENIZER, messages)
    chat = client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5)
    assert chat.choices[0].message.content == expected_text(chat_ids, 5)
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(chat_ids) and chat.usage.completion_tokens == 5
    chunks = list(client.chat.completions.create(model="fake-model", messages=messages, max_tokens=5,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected_text(chat_ids, 5)
    assert chunks[-1].usage.completion_tokens == 5

    prompt_ids = encode_prompt(TOKENIZER, "Once upon a time")
    completion = client.completions.create(model="fake-model", prompt="Once upon a time", max_tokens=7)
    assert completion.choices[0].text == expected_text(prompt_ids, 7)
    streamed = list(client.completions.create(model="fake-model", prompt="Once upon a time", max_tokens=7,
                                              stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected_text(prompt_ids, 7)
    assert [model.id for model in client.models.list().data] == ["fake-model"]


def test_sixteen_concurrent_streams_complete_and_metrics_add_up(cluster):
    before = metric_totals(cluster.base_url, 2)

    async def one(client: openai.AsyncOpenAI, index: int) -> tuple[str, str | None]:
        stream = await client.completions.create(model="fake-model", prompt=f"prompt {index}", max_tokens=20,
                                                 stream=True)
        text, finish_reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        return text, finish_reason

    async def all_streams():
        async with openai.AsyncOpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused",
                                      max_retries=0) as client:
            return await asyncio.gather(*(one(client, index) for index in range(16)))

    results = asyncio.run(all_streams())
    for index, (text, finish_reason) in enumerate(results):
        assert text == expected_text(encode_prompt(TOKENIZER, f"prompt {index}"), 20)
        assert finish_reason == "length"
    after = metric_totals(cluster.base_url, 2)
    finished = ("elastic:request_success_total", (("finished_reason", "length"),))
    assert after[finished] - before.get(finished, 0) == 16
    generated = ("elastic:generation_tokens_total", ())
    assert after[generated] - before.get(generated, 0) == 16 * 20
    ttft = ("elastic:time_to_first_token_seconds_count", ())
    assert after[ttft] - before.get(ttft, 0) == 16


def test_bad_inputs_get_their_status_and_the_server_keeps_serving(cluster, client):
    base = cluster.base_url
    malformed = httpx.post(f"{base}/v1/chat/completions", content=b"{not json",
                           headers={"content-type": "application/json"})
    assert malformed.status_code == 400 and malformed.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert not_found.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="fake-model", prompt="x" * 2100, max_tokens=5)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad_value:
        client.completions.create(model="fake-model", prompt="x", temperature=-1)
    assert bad_value.value.body["param"] == "temperature"
    failing = httpx.post(f"{base}/v1/completions", json={"prompt": "FAIL", "max_tokens": 9, "stream": True})
    assert failing.status_code == 200
    last_events = [line for line in failing.text.strip().splitlines() if line][-2:]
    assert last_events[0].startswith('data: {"error": ') and last_events[1] == "data: [DONE]"
    assert client.completions.create(model="fake-model", prompt="ok", max_tokens=2).choices[0].text


def test_disconnect_mid_stream_frees_the_request(cluster):
    before = metric_totals(cluster.base_url, 2)
    with httpx.stream("POST", f"{cluster.base_url}/v1/completions",
                      json={"prompt": "y" * 300, "max_tokens": 1000, "stream": True}) as response:
        replica = response.headers[REPLICA_HEADER]
        lines = response.iter_lines()
        for _ in range(3):
            assert next(lines).startswith("data: ")
            next(lines)

        def holds_kv():
            stats = cluster_view(cluster.base_url)["replicas"][replica]["stats"]
            return stats["kv_chunks_used"] > 15
        wait_for(holds_kv, "the stream's KV shows in the cluster view")
    # Closing the connection is the disconnect: the replica aborts the request and frees its KV.

    def freed():
        view = cluster_view(cluster.base_url)
        return all(entry["stats"]["kv_chunks_used"] == 0 and entry["stats"]["num_running"] == 0
                   and not entry["is_stale"] for entry in view["replicas"].values())
    wait_for(freed, "every replica back to zero KV")
    aborted = ("elastic:request_success_total", (("finished_reason", "abort"),))
    assert metric_totals(cluster.base_url, 2)[aborted] - before.get(aborted, 0) == 1


def test_client_giving_up_on_a_non_streaming_request_frees_it(cluster):
    before = metric_totals(cluster.base_url, 2)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{cluster.base_url}/v1/completions", json={"prompt": "z" * 200, "max_tokens": 1500},
                   timeout=1.0)

    def freed():
        view = cluster_view(cluster.base_url)
        return all(entry["stats"]["num_running"] == 0 and entry["stats"]["kv_chunks_used"] == 0
                   for entry in view["replicas"].values())
    wait_for(freed, "the abandoned request to be aborted", timeout_s=5)  # it would run for 15 s
    aborted = ("elastic:request_success_total", (("finished_reason", "abort"),))
    assert metric_totals(cluster.base_url, 2)[aborted] - before.get(aborted, 0) == 1


def test_router_prefers_kv_headroom_over_queue_length(cluster):
    """Replica L holds one request with a large KV; R then gets two small requests. New requests must go
    to R (more headroom) although its queue is longer (power-of-two on queue length would pick L)."""
    base = cluster.base_url
    with httpx.Client(timeout=60) as http:
        streams = []
        try:
            big = http.stream("POST", f"{base}/v1/completions",
                              json={"prompt": "x" * 900, "max_tokens": 1000, "stream": True})
            streams.append(big)
            loaded = big.__enter__().headers[REPLICA_HEADER]
            wait_for(lambda: cluster_view(base)["replicas"][loaded]["stats"]["kv_chunks_free"] < 10,
                     "the loaded replica's KV in the cluster view")
            time.sleep(1.2)  # the router's copy of the stats comes through Serve (period 0.5 s)
            placed = []
            for index in range(2):
                small = http.stream("POST", f"{base}/v1/completions",
                                    json={"prompt": f"s{index}", "max_tokens": 1000, "stream": True})
                streams.append(small)
                placed.append(small.__enter__().headers[REPLICA_HEADER])
            assert loaded not in placed, (loaded, placed)
            time.sleep(1.2)
            probes = [http.post(f"{base}/v1/completions", json={"prompt": "p", "max_tokens": 2})
                      for _ in range(6)]
            assert all(probe.status_code == 200 for probe in probes)
            assert [probe.headers[REPLICA_HEADER] for probe in probes] == [placed[0]] * 6
        finally:
            for stream in streams:
                stream.__exit__(None, None, None)


def test_cluster_view_has_every_replica(cluster):
    view = wait_for_fresh_replicas(cluster.base_url, 2)
    assert view["migration_policy"] == "none" and view["migrations"] == []
    for entry in view["replicas"].values():
        assert entry["age_s"] < 1.5
        assert entry["pools"][0]["chunks_per_client"]["activations"] == 2
    assert view["totals"]["kv_chunks_free"] + view["totals"]["kv_chunks_used"] == 2 * 64


def test_controller_exits_once_every_replica_is_gone(cluster):
    import ray

    from deployments.cluster.controller import get_or_create_controller
    from deployments.telemetry import ReplicaReport, ReplicaStats

    controller = get_or_create_controller("short-lived-controller", "elastic-serve", idle_exit_s=1.0)
    ray.get(controller.report.remote("r1", ReplicaReport(ReplicaStats())))
    assert ray.get(controller.cluster_view.remote())["num_replicas"] == 1
    ray.get(controller.deregister.remote("r1"))

    def gone() -> bool:
        try:
            ray.get_actor("short-lived-controller", namespace="elastic-serve")
        except ValueError:
            return True
        return False
    wait_for(gone, "the idle controller to end itself", timeout_s=15)


@pytest.mark.slow  # 14 s
def test_tensor_parallel_ranks_run_in_the_replicas_placement_group(cluster):
    """TP=2 with the real WorkerLauncher and a stand-in WorkerProcess: rank 1 is an actor in bundle 1 of
    the replica's placement group, and deleting the app stops it. This app also has an API key and an
    engine whose queue is always full, to see 401 and 503 come through the proxy."""
    import psutil
    from ray import serve

    from deployments.app import build_app

    app = build_app({"engine_factory": "tests.deployments.fake_engine:create_fake_tp_engine",
                     "engine_factory_kwargs": {"max_num_waiting": 0}, "api_key": "tp-key",
                     "tensor_parallel_size": 2, "cpus_per_rank": 0.5, "controller_name": TP_CONTROLLER})
    serve.run(app, name="fake-tp", route_prefix="/tp")
    base = f"{cluster.base_url}/tp"
    assert httpx.get(f"{base}/v1/memory").json()["error"]["code"] == "invalid_api_key"
    auth = {"Authorization": "Bearer tp-key"}
    ranks = httpx.get(f"{base}/v1/memory", headers=auth).json()["ranks"]
    assert len(ranks) == 2
    rank0, rank1 = (rank["placement"] for rank in ranks)
    assert rank0["placement_group_id"] and rank0["placement_group_id"] == rank1["placement_group_id"]
    assert rank0["pid"] != rank1["pid"]
    assert rank0["resources"]["CPU"] == rank1["resources"]["CPU"] == 0.5
    overloaded = httpx.post(f"{base}/v1/completions", json={"prompt": "tp", "max_tokens": 3}, headers=auth)
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "2"
    assert overloaded.json()["error"]["code"] == "overloaded"
    serve.delete("fake-tp")

    def rank1_gone() -> bool:
        try:
            return psutil.Process(rank1["pid"]).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    wait_for(rank1_gone, "the rank-1 worker to stop with its replica")


def test_shutdown_leaves_no_processes(cluster):
    import ray

    from deployments.cluster.controller import stop_controller

    assert ray.get_actor(CONTROLLER, namespace="elastic-serve") is not None
    assert stop_controller(CONTROLLER, "elastic-serve")
    stop_controller(TP_CONTROLLER, "elastic-serve")
    cluster.stop()
    assert cluster.leftover_processes() == []
