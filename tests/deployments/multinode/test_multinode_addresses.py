"""Addresses and placement for a multi-node cluster, without Ray (fast): which address and interface a process
group binds to, the Serve options that spread replicas, and KV channels between "nodes".

Two `KVChannels` in one process stand for replicas on two nodes: different Ray node ids and different
addresses (127.0.0.1 and 127.0.0.2, both loopback on Linux, so each side really binds its own address and
connects to the other's). Same node ids stand for two replicas of one node: the group stays on loopback.
"""

from __future__ import annotations

import asyncio
import socket

import pytest
import torch

from deployments.app import deployment_options
from deployments.args import AppArgs
from deployments.cluster.placement import (
    IFNAME_ENV,
    LOOPBACK,
    NodeAddress,
    configured_interface,
    interface_with_address,
    replica_placement_options,
)
from deployments.migration.kv_channel import KVChannels
from engine.migration import KVStage

pytestmark = pytest.mark.timeout(120)


def test_a_group_binds_loopback_on_one_node_and_the_node_address_across_nodes():
    node = NodeAddress("10.1.2.3", node_id="node-a")
    assert node.host_towards("node-a") == LOOPBACK
    assert node.host_towards("node-b") == "10.1.2.3"


def test_interface_lookup_by_address():
    names = {name for _, name in socket.if_nameindex()}
    assert interface_with_address(LOOPBACK) in names
    assert interface_with_address("198.51.100.77") is None  # TEST-NET-2: on no interface here


def test_configured_interface_prefers_the_arg_then_the_environment(monkeypatch):
    monkeypatch.delenv(IFNAME_ENV, raising=False)
    assert configured_interface(None) is None
    monkeypatch.setenv(IFNAME_ENV, "eth7")
    assert configured_interface(None) == "eth7"
    assert configured_interface("ens5") == "ens5"


def test_spreading_replicas_maps_to_servers_max_replicas_per_node():
    assert replica_placement_options(False, None, 1) == {}
    assert replica_placement_options(True, None, 1) == {"max_replicas_per_node": 1}
    assert replica_placement_options(True, 3, 1) == {"max_replicas_per_node": 3}
    with pytest.raises(ValueError, match="tensor_parallel_size 1"):
        replica_placement_options(True, None, 2)


def test_deployment_options_carry_the_placement():
    spread = AppArgs.model_validate({"device": "cpu", "placement": {"spread_replicas": True}})
    assert deployment_options(spread)["max_replicas_per_node"] == 1
    assert "max_replicas_per_node" not in deployment_options(AppArgs.model_validate({"device": "cpu"}))
    tp2 = AppArgs.model_validate({"device": "cpu", "tensor_parallel_size": 2})
    options = deployment_options(tp2)
    assert options["placement_group_strategy"] == "STRICT_PACK" and len(options["placement_group_bundles"]) == 2
    split = AppArgs.model_validate({"device": "cpu", "tensor_parallel_size": 2,
                                    "deployment_options": {"placement_group_strategy": "PACK"}})
    with pytest.raises(ValueError, match="STRICT_PACK"):
        deployment_options(split)
    with pytest.raises(ValueError, match="extra"):
        AppArgs.model_validate({"placement": {"spread": True}})


def kv_stage(start: int, end: int, seed: int) -> KVStage:
    generator = torch.Generator().manual_seed(seed)
    n = end - start
    return KVStage(start, end, [(torch.randn(n, 2, 8, generator=generator), torch.randn(n, 2, 8, generator=generator))])


def transfer(sender: KVChannels, receiver: KVChannels, stages: list[KVStage]) -> list[KVStage]:
    received = []

    async def join(address) -> None:
        await receiver.join("A", address)

    async def deliver(header) -> None:
        received.append(await receiver.receive("A", header))

    async def scenario():
        for kv in stages:
            await asyncio.wait_for(sender.send("B", kv, join, deliver), 30)

    asyncio.run(scenario())
    return received


def assert_same(a: KVStage, b: KVStage) -> None:
    assert (a.start, a.end) == (b.start, b.end)
    for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


@pytest.mark.parametrize("interface", [None, "loopback-interface"])
def test_kv_channel_between_two_nodes_binds_each_nodes_address(interface):
    if interface is not None:
        interface = interface_with_address(LOOPBACK)  # both "nodes" live on this machine's loopback
    a = KVChannels("127.0.0.1", timeout_s=10.0, node_id="node-a", interface=interface)
    b = KVChannels("127.0.0.2", timeout_s=10.0, node_id="node-b", interface=interface)
    stages = [kv_stage(0, 16, 1), kv_stage(16, 20, 2)]
    received = transfer(a, b, stages)
    for sent, got in zip(stages, received, strict=True):
        assert_same(got, sent)
    assert a.peer_nodes() == {"B": ("node-b", False)}
    assert b.peer_nodes() == {"A": ("node-a", False)}
    assert (a.num_groups_built, b.num_groups_built) == (1, 1)


def test_kv_channel_within_one_node_stays_on_loopback():
    a = KVChannels("127.0.0.2", timeout_s=10.0, node_id="node-a")
    b = KVChannels("127.0.0.2", timeout_s=10.0, node_id="node-a")
    (got,) = transfer(a, b, [kv_stage(0, 8, 3)])
    assert_same(got, kv_stage(0, 8, 3))
    assert a.peer_nodes() == {"B": ("node-a", True)} and b.peer_nodes() == {"A": ("node-a", True)}
