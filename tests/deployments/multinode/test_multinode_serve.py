"""The application on a real multi-node Ray cluster with the real model (slow: `make test-all`).

A head node (GCS, Serve's controller and proxy, the cluster controller; no CPUs) and three worker nodes of
one CPU each, at 127.0.0.2-4. Two LLMServer replicas (embedded SmolLM2, fp32, small pools) with
`placement: {spread_replicas: true}` land on two of them; the third is spare. In order:
- each replica is on its own node, serves a request, and the cluster controller reports both;
- a request migrated live (KV copied over gloo point-to-point, the torch_distributed transport) from the
  replica on one node to the replica on the other streams the same greedy tokens as the unmigrated run;
- a node is removed while a request streams on each replica: the request on the surviving node finishes
  with every token, the lost one ends with an error event (the proxy guard: replica_unavailable) and
  [DONE], and Serve starts a replacement replica on the spare node, which serves and reports to the
  controller.
"""

from __future__ import annotations

import json

import httpx
import pytest

from deployments.ingress.openai_app import REPLICA_HEADER
from tests.deployments.migration.test_migration_serve import (
    ARGS as MIGRATION_TEST_ARGS,
)
from tests.deployments.migration.test_migration_serve import (
    AUTH,
    MIGRATE_AFTER,
    NUM_TOKENS,
    Stream,
    cluster_view,
    counter,
    force,
    is_idle,
    migration_stats,
    reference,
)
from tests.deployments.multinode.multinode_cluster import MultiNodeRayCluster, replica_nodes
from tests.deployments.serve_helpers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
APP = "mn-llm"
CONTROLLER = "multinode-test-controller"
# The migration tests' engine configuration (so their in-process reference run applies), spread over nodes.
ARGS = {**MIGRATION_TEST_ARGS, "controller_name": CONTROLLER, "placement": {"spread_replicas": True},
        "migration": {**MIGRATION_TEST_ARGS["migration"], "transport": "torch_distributed"}}


@pytest.fixture(scope="module")
def expected():
    return reference()


@pytest.fixture(scope="module")
def cluster(expected):
    from ray import serve

    from deployments.app import build_app

    cluster = MultiNodeRayCluster(num_worker_nodes=3)
    try:
        cluster.start()
        serve.run(build_app({**ARGS, "deployment_options": {"num_replicas": 2}}), name=APP, route_prefix="/")
        wait_for(lambda: fresh_replicas(cluster.base_url) == 2, "2 replicas reporting", timeout_s=300)
        yield cluster
    finally:
        cluster.stop()
    assert cluster.leftover_processes() == []


def fresh_replicas(base: str) -> int:
    view = cluster_view(base)
    return sum(not entry["is_stale"] for entry in view["replicas"].values()) if view["num_replicas"] == 2 else 0


def complete(base: str, max_tokens: int = 4) -> str:
    response = httpx.post(f"{base}/v1/completions", headers=AUTH, timeout=60,
                          json={"prompt": "Once upon a time", "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == max_tokens
    return response.headers[REPLICA_HEADER]


def serve_on_every_replica(base: str, replicas: set[str]) -> None:
    served: set[str] = set()

    def all_served() -> bool:
        served.add(complete(base))  # KV-headroom routing with random ties: ask until each answered
        return served == replicas

    wait_for(all_served, f"a request served by each of {sorted(replicas)}", timeout_s=120, interval_s=0)


def test_each_replica_on_its_own_node_serves_and_reports(cluster):
    nodes = replica_nodes(APP)
    assert len(nodes) == 2 and len(set(nodes.values())) == 2
    assert set(nodes.values()) <= {node.node_id for node in cluster.workers}
    view = cluster_view(cluster.base_url)
    assert set(view["replicas"]) == set(nodes) and not any(e["is_stale"] for e in view["replicas"].values())
    serve_on_every_replica(cluster.base_url, set(nodes))


def test_live_migration_between_nodes_gives_the_unmigrated_tokens(cluster, expected):
    base = cluster.base_url
    wait_for(lambda: is_idle(base), "idle replicas")
    nodes = replica_nodes(APP)
    committed = counter(base, "committed")
    with httpx.Client() as http:
        stream = Stream(http, base)
        try:
            stream.read(MIGRATE_AFTER)
            assert force(base, stream.response_id, "copy")["status"] in ("queued", "pending")
            stream.read()
        finally:
            stream.close()
    source = stream.replica
    (target,) = set(nodes) - {source}
    assert nodes[source] != nodes[target]  # the KV crossed from one node to the other
    assert stream.tokens == expected["tokens"] and stream.text == expected["text"]
    wait_for(lambda: counter(base, "committed")[source] == committed[source] + 1, "the source's commit")
    stats = migration_stats(base)
    assert stats[source]["copy"] >= 1 and stats[source]["bytes_moved"] > 0 and stats[target]["adopted"] >= 1
    wait_for(lambda: is_idle(base), "both pools idle after the migrated request finished")


def read_to_the_end(stream: Stream) -> list[str]:
    """How a stream ended: its last events ("[DONE]", "error:<code>"), then "broken" if the connection ended
    without [DONE]."""
    endings: list[str] = []
    try:
        while True:
            line = next(stream._lines)
            if not line:
                continue
            payload = line.removeprefix("data: ")
            if payload == "[DONE]":
                return [*endings, "[DONE]"]
            event = json.loads(payload)
            if "error" in event:
                endings.append(f"error:{event['error']['code']}")
                continue
            for choice in event["choices"]:
                stream.tokens.extend(choice["logprobs"]["tokens"] if choice.get("logprobs") else [])
    except (httpx.HTTPError, StopIteration):
        return [*endings, "broken"]


def test_losing_a_node_keeps_the_other_nodes_requests_and_serve_replaces_the_replica(cluster, expected):
    base = cluster.base_url
    wait_for(lambda: is_idle(base), "idle replicas")
    nodes = replica_nodes(APP)
    with httpx.Client() as http:
        streams: dict[str, Stream] = {}
        extra: list[Stream] = []
        for _ in range(4):  # the router spreads by KV headroom: open streams until each replica has one
            stream = Stream(http, base)
            stream.read(1)
            (extra if stream.replica in streams else streams.__setitem__(stream.replica, stream) or []).append(stream)
            if len(streams) == 2:
                break
        assert set(streams) == set(nodes)
        lost_replica, surviving_replica = sorted(nodes)
        lost_node_id = nodes[lost_replica]
        cluster.remove_node(cluster.node_of(lost_node_id))
        try:
            streams[surviving_replica].read()
            assert streams[surviving_replica].tokens == expected["tokens"]
            ending = read_to_the_end(streams[lost_replica])
            assert ending == ["error:replica_unavailable", "[DONE]"]  # the proxy guard's ending
            assert len(streams[lost_replica].tokens) < NUM_TOKENS
        finally:
            for stream in [*streams.values(), *extra]:
                stream.close()

    def replaced() -> dict[str, str] | None:
        now = replica_nodes(APP)
        return now if len(now) == 2 and lost_replica not in now else None

    now = wait_for(replaced, "Serve's replacement replica", timeout_s=240, interval_s=1)
    (new_replica,) = set(now) - {surviving_replica}
    spare = {node.node_id for node in cluster.workers} - {nodes[surviving_replica]}
    assert now[new_replica] in spare and now[new_replica] != lost_node_id
    wait_for(lambda: set(cluster_view(base)["replicas"]) == set(now) and fresh_replicas(base) == 2,
             "the controller forgetting the lost replica and seeing the new one", timeout_s=180, interval_s=1)
    serve_on_every_replica(base, set(now))
