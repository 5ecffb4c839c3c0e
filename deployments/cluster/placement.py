"""Where the application's actors run on a multi-node Ray cluster, and which address their sockets use.

- Replicas: with `placement.spread_replicas` (or `max_replicas_per_node`) Serve puts at most that many
  replicas of the deployment on one node (`max_replicas_per_node`, Serve's per-node implicit resource).
  A tensor-parallel replica is one STRICT_PACK placement group: its ranks always share a node, which is
  what lets them rendezvous through a file and talk over the loopback interface.
- The cluster controller: named and detached, so any node finds it by name; it runs on the head node so
  that losing a worker node does not take the cluster view (and the migration planner) with it.
- Addresses: a process group between two nodes binds to the node's address as Ray reports it
  (`ray.util.get_node_ip_address()`), or to the interface named by `network_interface` / the
  ELASTIC_GLOO_IFNAME environment variable; between two processes of one node it stays on loopback.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Any

IFNAME_ENV = "ELASTIC_GLOO_IFNAME"
LOOPBACK = "127.0.0.1"
_SIOCGIFADDR = 0x8915  # Linux ioctl: an interface's IPv4 address


@dataclass(frozen=True)
class NodeAddress:
    """How this process is reached by process groups: its Ray node, that node's address, and an optional
    interface for traffic between nodes."""

    host: str
    node_id: str
    interface: str | None = None

    def host_towards(self, peer_node_id: str) -> str:
        """The address to bind for a group with a process on `peer_node_id`: loopback on the same node."""
        return LOOPBACK if peer_node_id == self.node_id else self.host


def configured_interface(interface: str | None) -> str | None:
    """The interface named in the app's args, else in ELASTIC_GLOO_IFNAME (read on the replica's node: pods
    of one cluster may name their interfaces differently), else None (bind by address)."""
    return interface or os.environ.get(IFNAME_ENV) or None


def interface_with_address(address: str) -> str | None:
    """The name of the local network interface that carries IPv4 `address` (Linux), None if none does."""
    wanted = ipaddress.ip_address(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(sock.fileno(), _SIOCGIFADDR, request)
            except OSError:  # no IPv4 address on this interface
                continue
            if ipaddress.ip_address(socket.inet_ntoa(reply[20:24])) == wanted:
                return name
    return None


def tensor_parallel_interface() -> str:
    """The interface of a tensor-parallel replica's gloo group: its ranks share a node (STRICT_PACK), so the
    one carrying the loopback address."""
    name = interface_with_address(LOOPBACK)
    if name is None:
        raise RuntimeError(f"no network interface carries {LOOPBACK}: tensor parallelism on CPU needs loopback")
    return name


def local_node(interface: str | None = None) -> NodeAddress:
    """This Ray worker's node: its id and its address as Ray reports it."""
    import ray

    return NodeAddress(ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id(),
                       configured_interface(interface))


def replica_placement_options(spread_replicas: bool, max_replicas_per_node: int | None,
                              tensor_parallel_size: int) -> dict[str, Any]:
    """Serve deployment options that spread replicas over nodes."""
    limit = max_replicas_per_node if max_replicas_per_node is not None else (1 if spread_replicas else None)
    if limit is None:
        return {}
    if tensor_parallel_size > 1:
        # Serve rejects max_replicas_per_node with placement_group_bundles (ray.serve.schema).
        raise ValueError("placement.spread_replicas / max_replicas_per_node need tensor_parallel_size 1: Serve "
                         "does not combine them with a replica's placement group (its default scheduling "
                         "already spreads replicas over nodes, best effort)")
    return {"max_replicas_per_node": limit}


def head_node_id() -> str | None:
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def controller_scheduling_strategy() -> Any:
    """Hard affinity to the head node: the GCS lives there, so when it goes the cluster goes anyway, and the
    actor needs no CPU, so it always fits. (Soft affinity was seen to land on a worker node when the head has
    no CPUs, as KubeRay heads often do.) Any node when no head is known."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = head_node_id()
    return "DEFAULT" if node_id is None else NodeAffinitySchedulingStrategy(node_id, soft=False)
