"""The fast multi-node check (default suite): a head node and two worker nodes of one real Ray cluster, the
application with the fake engine and `placement: {spread_replicas: true}`. Each replica lands on its own
worker node (node ids from the GCS), each serves a request, and the cluster controller (one detached actor on
the head node) sees both. On the same cluster (slow): a tensor-parallel replica's ranks share one worker
node. test_multinode_serve.py does the rest with the real model: migration between nodes, losing a node."""

from __future__ import annotations

import httpx
import pytest

from deployments.ingress.openai_app import REPLICA_HEADER
from tests.deployments.multinode.multinode_cluster import MultiNodeRayCluster, replica_nodes
from tests.deployments.serve_helpers import cluster_view, wait_for, wait_for_fresh_replicas

# slow: a 3-node cluster takes 70-180 s to start on a 2-core box and was seen to hang once there
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
CONTROLLER = "multinode-smoke-controller"
APP = "mn-fake"


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    from deployments.app import build_app

    cluster = MultiNodeRayCluster(num_worker_nodes=2)
    try:
        cluster.start()
        app = build_app({"engine_factory": "tests.deployments.fake_engine:create_fake_engine",
                         "engine_factory_kwargs": {"token_delay_s": 0.01}, "controller_name": CONTROLLER,
                         "placement": {"spread_replicas": True}, "cpus_per_rank": 0.5,  # room for a TP app
                         "deployment_options": {"num_replicas": 2}})
        serve.run(app, name=APP, route_prefix="/")
        wait_for_fresh_replicas(cluster.base_url, 2, timeout_s=180)  # generous: the box is shared
        yield cluster
    finally:
        cluster.stop()
    assert cluster.leftover_processes() == []


def test_replicas_spread_over_nodes_and_each_serves(cluster):
    import ray

    nodes = replica_nodes(APP)
    workers = {node.node_id for node in cluster.workers}
    assert len(nodes) == 2 and set(nodes.values()) == workers  # one replica on each worker node
    controller = ray.get_actor(CONTROLLER, namespace="elastic-serve")
    controller_node = ray._private.state.actors()[controller._actor_id.hex()]["Address"]["NodeID"]
    assert controller_node == cluster.head_node_id
    assert set(cluster_view(cluster.base_url)["replicas"]) == set(nodes)

    served: dict[str, int] = {}

    def both_served() -> bool:
        # The router ranks by KV headroom with random ties: keep asking until each replica answered once.
        response = httpx.post(f"{cluster.base_url}/v1/completions", timeout=30,
                              json={"prompt": "Once upon a time", "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 4
        replica = response.headers[REPLICA_HEADER]
        served[replica] = served.get(replica, 0) + 1
        return set(served) == set(nodes)

    wait_for(both_served, "a request served on each node", timeout_s=60, interval_s=0)


@pytest.mark.slow
def test_tensor_parallel_ranks_share_a_node(cluster):
    """TP=2 with the real WorkerLauncher and a stand-in rank: both ranks (0.25 CPU each) on one worker node."""
    from ray import serve

    from deployments.app import build_app

    app = build_app({"engine_factory": "tests.deployments.fake_engine:create_fake_tp_engine",
                     "tensor_parallel_size": 2, "cpus_per_rank": 0.25, "controller_name": CONTROLLER})
    serve.run(app, name="mn-fake-tp", route_prefix="/tp")
    try:
        ranks = httpx.get(f"{cluster.base_url}/tp/v1/memory", timeout=30).json()["ranks"]
        rank0, rank1 = (rank["placement"] for rank in ranks)
        assert rank0["node_id"] == rank1["node_id"] and rank0["node_id"] in {node.node_id for node in cluster.workers}
        assert rank0["placement_group_id"] == rank1["placement_group_id"] and rank0["pid"] != rank1["pid"]
    finally:
        serve.delete("mn-fake-tp")
