"""Tensor parallelism through Ray Serve with the real engine: greedy text with TP=2 equals TP=1 (fp32).

Skipped where engine.parallel (WorkerProcess, create_executor) is missing. The placement mechanics are
also tested with a stand-in worker in test_serve_fake_engine.py."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.deployments.ingress.test_serve_real_model import CHAT, NUM_TOKENS, PROMPT, reference_texts
from tests.deployments.ray_cluster import LocalRayCluster
from tests.deployments.serve_helpers import wait_for_fresh_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
pytest.importorskip("engine.parallel.executor", reason="engine.parallel.executor (the TP executor) has not landed")

CONTROLLER = "tp-test-controller"
ARGS = {"device": "cpu", "dtype": "float32", "device_memory": "640MiB", "host_buffer": "256MiB",
        "enable_prefix_caching": False, "controller_name": CONTROLLER}


def test_tp2_greedy_equals_tp1():
    from ray import serve

    from deployments.app import build_app
    from deployments.cluster.controller import stop_controller

    reference = reference_texts()  # TP=1, in this process, before Ray takes the CPUs
    cluster = LocalRayCluster()
    try:
        cluster.start()
        serve.run(build_app({**ARGS, "tensor_parallel_size": 2, "cpus_per_rank": 1}), name="tp",
                  route_prefix="/")
        wait_for_fresh_replicas(cluster.base_url, 1, timeout_s=180)
        cluster.remember_processes()
        client = openai.OpenAI(base_url=f"{cluster.base_url}/v1", api_key="unused", max_retries=0, timeout=300)
        chat = client.chat.completions.create(model=reference["model"], messages=CHAT, max_tokens=NUM_TOKENS,
                                              temperature=0)
        assert chat.choices[0].message.content == reference["chat"]
        completion = client.completions.create(model=reference["model"], prompt=PROMPT, max_tokens=NUM_TOKENS,
                                               temperature=0)
        assert completion.choices[0].text == reference["completion"]
        num_ranks_reported = len(httpx.get(f"{cluster.base_url}/v1/memory").json()["ranks"])
        stop_controller(CONTROLLER, "elastic-serve")
    finally:
        cluster.stop()
    assert cluster.leftover_processes() == []
    assert num_ranks_reported == 2  # /v1/memory: one pool per rank
