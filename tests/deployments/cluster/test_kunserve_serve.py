"""KunServe through real Ray Serve: two LLMServer replicas (embedded SmolLM2, fp32) with parameter dropping
and watermarks so low that one request is a spike. The controller's drop plan pairs the replicas, each hears
its order in its own reply and they meet at the leader's store (no call between them), both drop
complementary layers, and every request runs on the cross-process pipeline; once idle, the pair restores.
A stream that spans the drop and the restore, and one that runs wholly while dropped, give the engine's own
greedy tokens (which equal transformers' fp32: tests/engine/core); /v1/cluster shows the drop and the restore."""

from __future__ import annotations

import httpx
import pytest

from tests.deployments.migration.test_migration_serve import ARGS, AUTH, PINNED_ROUTER, Stream, cluster_view, reference
from tests.deployments.ray_cluster import LocalRayCluster
from tests.deployments.serve_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]  # a Ray cluster and two fp32 replicas: minutes here
DROPPING = {"enabled": True, "high_watermark": 0.02, "restore_watermark": 0.01, "drop_after_s": 0.0,
            "restore_after_s": 2.0}
NUM_TOKENS = 160


def dropping(base: str) -> dict:
    return cluster_view(base).get("parameter_dropping", {})


def states(base: str) -> set[str]:
    return {entry["state"] for entry in dropping(base).get("replicas", {}).values()}


@pytest.fixture(scope="module")
def expected():
    return reference(NUM_TOKENS)


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    from deployments.app import build_app

    cluster = LocalRayCluster()
    try:
        cluster.start()
        args = {**ARGS, "controller_name": "kunserve-test-controller", "parameter_dropping": DROPPING}
        app = build_app({**args, "deployment_options": {"num_replicas": 2, "request_router_config": PINNED_ROUTER}})
        serve.run(app, name="llm", route_prefix="/")
        wait_for(lambda: len(dropping(cluster.base_url).get("replicas", {})) == 2, "2 replicas reporting",
                 timeout_s=180)
        cluster.remember_processes()
        yield cluster
    finally:
        cluster.stop()


def test_a_spike_forms_a_cross_process_pair_and_streams_stay_exact(cluster, expected):
    base = cluster.base_url
    with httpx.Client() as http:
        spanning = Stream(http, base, NUM_TOKENS)
        spanning.read(4)
        wait_for(lambda: states(base) == {"dropped"}, "the pair to form", timeout_s=60)
        view = dropping(base)
        assert view["num_drops"] == 1
        assert all(entry["dropped_layers"] > 0 for entry in view["replicas"].values())
        wholly = Stream(http, base, 24)  # runs wholly on the pipeline
        wholly.read()
        assert wholly.tokens == expected["tokens"][:24]
        assert states(base) == {"dropped"}
        spanning.read()
        spanning.close()
        wholly.close()
    assert spanning.tokens == expected["tokens"] and spanning.text == expected["text"]
    wait_for(lambda: dropping(base)["num_restores"] >= 1 and states(base) == {"normal"}, "the restore", timeout_s=60)
    replicas = cluster_view(base)["replicas"]
    assert all(entry["stats"]["kv_chunks_used"] == 0 for entry in replicas.values())
    after = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=60,
                       json={"prompt": "x", "max_tokens": 1}).status_code
    assert after == 200
