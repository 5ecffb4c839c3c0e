"""A real multi-node Ray cluster on this one machine (`ray.cluster_utils.Cluster`, how Ray tests itself).

The head node has no CPUs: it runs the GCS, Serve's controller and HTTP proxy (HeadOnly, on 127.0.0.1) and
the cluster controller, never a replica. Each worker node is its own raylet with `num_cpus` CPUs, its own node
id and its own address: 127.0.0.2, 127.0.0.3, ... (all loopback on Linux), so a process group between two
nodes really binds two different addresses. Ray writes the cluster's address under $RAY_TMPDIR: it points to
this cluster's temp dir while the cluster runs, so nothing lands in the shared /tmp/ray.
"""

from __future__ import annotations

import os
import shutil

from tests.deployments.ray_cluster import REPO, LocalRayCluster

OBJECT_STORE_BYTES = 80 << 20  # per node: the KV moves over gloo or in small stages


class MultiNodeRayCluster(LocalRayCluster):
    """LocalRayCluster's temp dir, port and leftover-process check, with a head and worker nodes."""

    def __init__(self, num_worker_nodes: int = 2, cpus_per_node: int = 1):
        super().__init__(num_cpus=cpus_per_node)
        self.num_worker_nodes = num_worker_nodes
        self.cluster = None
        self.workers: list = []  # ray._private.node.Node, in the order they were added
        self._next_address = 2
        self._saved_tmpdir = os.environ.get("RAY_TMPDIR")

    def start(self) -> None:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster

        os.environ["RAY_TMPDIR"] = self.temp_dir
        os.makedirs(os.path.join(self.temp_dir, "ray"), exist_ok=True)
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "node_ip_address": "127.0.0.1", "temp_dir": self.temp_dir, "include_dashboard": False,
            "object_store_memory": OBJECT_STORE_BYTES})
        for _ in range(self.num_worker_nodes):
            self.add_node()
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(address=self.cluster.address, runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 log_to_driver=False)
        self.is_running = True
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.port})

    def add_node(self):
        node = self.cluster.add_node(num_cpus=self.num_cpus, node_ip_address=f"127.0.0.{self._next_address}",
                                     temp_dir=self.temp_dir, object_store_memory=OBJECT_STORE_BYTES)
        self._next_address += 1
        self.workers.append(node)
        self.remember_processes()
        return node

    def remove_node(self, node) -> None:
        self.remember_processes()
        self.cluster.remove_node(node, allow_graceful=False)  # a node that dies, not one that drains
        self.workers.remove(node)

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def node_of(self, node_id: str):
        (node,) = [node for node in self.workers if node.node_id == node_id]
        return node

    def stop(self) -> None:
        try:
            super().stop()  # Serve and the driver; removes the temp dir
        finally:
            if self.cluster is not None:
                self.cluster.shutdown()
                self.cluster = None
            if self._saved_tmpdir is None:
                os.environ.pop("RAY_TMPDIR", None)
            else:
                os.environ["RAY_TMPDIR"] = self._saved_tmpdir
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def replica_nodes(app_name: str, deployment: str = "LLMServer") -> dict[str, str]:
    """{replica id (as the X-Replica header shows it): node id} for the live replicas, from the GCS actor table."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#{deployment}#"
    return {info["Name"].removeprefix(prefix): info["Address"]["NodeID"]
            for info in ray._private.state.actors().values()
            if info["Name"].startswith(prefix) and info["State"] == "ALIVE"}
