"""Packing drives Ray Serve's downscaling, end to end (slow: ~2 minutes): two real-engine replicas under
`autoscaling_config` with `deployments.cluster.autoscaling:kv_packing_policy`. A long greedy stream runs on the
newest replica (the test opens streams until one lands there); switching the controller to `balance+pack` with
`drain: newest` migrates it to the older replica, the newest reports drained, and Serve scales down to one
replica. The client's stream is the unmigrated greedy run's, token by token, although the replica it
connected to is stopped (Serve's graceful shutdown waits for the relayed stream to end)."""

from __future__ import annotations

import httpx
import pytest

from tests.deployments.migration.test_migration_serve import ARGS, AUTH, Stream, cluster_view, reference
from tests.deployments.ray_cluster import LocalRayCluster
from tests.deployments.serve_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 2, "downscale_delay_s": 2.0,
               "upscale_delay_s": 600.0, "metrics_interval_s": 0.5, "look_back_period_s": 1.0,
               "policy": {"policy_function": "deployments.cluster.autoscaling:kv_packing_policy"}}
PACK = {"drain": "newest", "pack_watermark": 0.9, "pack_interval_s": 1.0}
NUM_TOKENS = 400


def set_policy(base: str, name: str, options: dict | None = None) -> None:
    response = httpx.post(f"{base}/v1/admin/migration_policy", json={"name": name, "options": options or {}},
                          headers=AUTH, timeout=10)
    response.raise_for_status()


def request_replica(base: str, request_id: str) -> str | None:
    for replica, entry in cluster_view(base)["replicas"].items():
        if not entry["is_stale"] and any(r["request_id"] == request_id for r in entry.get("requests") or ()):
            return replica
    return None


def test_packing_drains_the_newest_replica_and_serve_scales_it_down():
    from ray import serve

    from deployments.app import build_app

    expected = reference(NUM_TOKENS)
    cluster = LocalRayCluster()
    try:
        cluster.start()
        args = {**ARGS, "controller_name": "autoscaling-test-controller", "migration_policy": "none",
                "deployment_options": {"autoscaling_config": AUTOSCALING}}
        serve.run(build_app(args), name="llm", route_prefix="/")
        base = cluster.base_url
        wait_for(lambda: cluster_view(base)["num_replicas"] == 2 and all(
            entry.get("started_at") for entry in cluster_view(base)["replicas"].values()), "2 replicas", 180)
        replicas = cluster_view(base)["replicas"]
        newest = max(replicas, key=lambda replica: replicas[replica]["started_at"])
        with httpx.Client() as http:
            for _ in range(16):  # the router spreads requests: open streams until one runs on the newest
                stream = Stream(http, base, max_tokens=NUM_TOKENS)
                if stream.replica == newest:
                    break
                stream.close()
            assert stream.replica == newest
            try:
                stream.read(4)
                request_id = f"{stream.response_id}-0"
                wait_for(lambda: request_replica(base, request_id) == newest, "the request reported")
                assert cluster_view(base)["num_replicas"] == 2  # with `none` nothing drains or scales down
                set_policy(base, "balance+pack", PACK)
                wait_for(lambda: request_replica(base, request_id) not in (None, newest),
                         "the pack policy moving the request off the newest replica", 60)
                stream.read()
            finally:
                stream.close()
        assert stream.tokens == expected["tokens"] and stream.text == expected["text"]
        deployment = lambda: serve.status().applications["llm"].deployments["LLMServer"]  # noqa: E731
        wait_for(lambda: deployment().replica_states == {"RUNNING": 1}, "Serve scaling down to one replica", 120)
        wait_for(lambda: newest not in cluster_view(base)["replicas"], "the newest replica gone", 60)
        assert list(cluster_view(base)["replicas"]) == [min(replicas, key=lambda r: replicas[r]["started_at"])]
    finally:
        cluster.stop()
