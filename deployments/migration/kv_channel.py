"""Bulk KV transfer between two replicas over torch.distributed point-to-point: gloo on CPU, NCCL on GPU.

A replica's `KVChannels` holds one two-rank process group per peer and direction. The sender is rank 0
and hosts the group's TCPStore on its node's address (as Ray reports it; the store listens on every
interface); it asks the receiver to join (through the control channel, a targeted Serve call:
deployments/migration/transport.py) and both build the group at once. Each side first writes its Ray node id
to the store and reads the other's: on one node both bind gloo to loopback, across nodes each binds to its
node's address (or to the configured interface: deployments/cluster/placement.py). A group is built on first use
and dropped after any failure, so the next transfer builds a fresh one. Groups are made directly
(`ProcessGroupGloo(store, rank, 2)`), not with `init_process_group`, so they leave the default group (a
tensor-parallel engine's) alone and any pair of replicas can talk, whenever they come and go.

A stage travels as one flat tensor (every layer's K and V back to back) under a tag unique to the
transfer; its `StageHeader` (token range, shapes, dtype, tag) goes over the control channel. Blocking
collective calls run in worker threads, so the replica's event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from deployments.cluster.placement import NodeAddress
from engine.migration import KVStage, StageHeader, pack, unpack  # the wire format lives with KVStage

SENDER, RECEIVER = 0, 1
LOCAL_NODE = "local"  # the node id of channels made outside Ray (tests, benchmarks): all on one node


@dataclass(frozen=True)
class ChannelAddress:
    """Where the receiver joins the sender's group."""

    host: str
    port: int
    name: str  # the group's key prefix in the store: unique per group
    backend: str  # "gloo" | "nccl"


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class _Pair:
    """A two-rank process group (blocking calls: run them in a worker thread)."""

    def __init__(self, address: ChannelAddress, rank: int, store: dist.Store, node: NodeAddress, timeout_s: float):
        self.backend = address.backend
        self.store = store  # the sender's store must live as long as the group
        self.lock = asyncio.Lock()  # one transfer at a time per pair: point-to-point calls pair up in order
        timeout = datetime.timedelta(seconds=timeout_s)
        prefixed = dist.PrefixStore(address.name, store)
        prefixed.set(f"node/{rank}", node.node_id)
        self.peer_node_id = prefixed.get(f"node/{1 - rank}").decode()  # blocks until the peer wrote it
        self.is_local = self.peer_node_id == node.node_id
        if address.backend == "nccl":
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.group = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
        else:
            options = dist.ProcessGroupGloo._Options()
            options._timeout = timeout
            options._devices = [_gloo_device(node, self.peer_node_id)]
            self.group = dist.ProcessGroupGloo(prefixed, rank, 2, options)

    def send(self, flat: torch.Tensor, tag: int) -> None:
        self.group.send([flat], RECEIVER, tag).wait()
        _synchronize(flat.device)

    def recv(self, flat: torch.Tensor, tag: int) -> None:
        self.group.recv([flat], SENDER, tag).wait()
        _synchronize(flat.device)


def open_group(address: ChannelAddress, rank: int, store: dist.Store, node: NodeAddress, timeout_s: float) -> _Pair:
    """A two-rank group like the KV channels' (blocking until the peer joins): KunServe's cooperative pairs
    use it for their stage-to-stage traffic (deployments/cluster/cooperation.py)."""
    return _Pair(address, rank, store, node, timeout_s)


def host_store(host: str, timeout_s: float) -> dist.TCPStore:
    """Rank 0's store for a new group, on this node's address at a free port."""
    return dist.TCPStore(host, 0, 2, True, timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def join_store(address: ChannelAddress, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(address.host, address.port, 2, False, timeout=datetime.timedelta(seconds=timeout_s))


def _gloo_device(node: NodeAddress, peer_node_id: str):
    if peer_node_id != node.node_id and node.interface is not None:
        return dist.ProcessGroupGloo.create_device(interface=node.interface)
    return dist.ProcessGroupGloo.create_device(hostname=node.host_towards(peer_node_id))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":  # NCCL's wait only orders streams: the tensor is used from another thread next
        torch.cuda.synchronize(device)


class KVChannels:
    """This replica's point-to-point groups: as sender, one per destination; as receiver, one per source."""

    def __init__(self, host: str, device: torch.device | str = "cpu", timeout_s: float = 30.0, *,
                 node_id: str = LOCAL_NODE, interface: str | None = None):
        """`host`: this node's address as Ray reports it; `node_id`: its Ray node id; `interface`: the network
        interface for groups with other nodes (None: bind to `host`)."""
        self.host = host
        self.node = NodeAddress(host, node_id, interface)
        self.device = torch.device(device)
        self.timeout_s = timeout_s
        self._senders: dict[str, _Pair] = {}
        self._receivers: dict[str, _Pair] = {}
        self._connecting: dict[str, asyncio.Lock] = {}
        self._tags = itertools.count(1)
        self.num_groups_built = 0

    # ---- sender ----------------------------------------------------------------------------------------
    async def send(self, peer: str, stage: KVStage, join: Callable[[ChannelAddress], Awaitable[None]],
                   deliver: Callable[[StageHeader], Awaitable[None]]) -> None:
        """Sends `stage` to `peer`. `join(address)` asks the peer to join a new group (first use);
        `deliver(header)` asks it to receive the stage (and store it). Both are control-channel calls."""
        header, flat = pack(stage, next(self._tags))
        pair = await self._sender_pair(peer, backend_for(flat.device), join)
        async with pair.lock:
            sending = asyncio.ensure_future(asyncio.to_thread(pair.send, flat, header.tag))
            try:
                await asyncio.gather(sending, deliver(header))
            except BaseException:
                self._senders.pop(peer, None)  # the stream of point-to-point calls may be out of step now
                raise

    async def _sender_pair(self, peer: str, backend: str,
                           join: Callable[[ChannelAddress], Awaitable[None]]) -> _Pair:
        async with self._connecting.setdefault(peer, asyncio.Lock()):
            pair = self._senders.get(peer)
            if pair is not None and pair.backend == backend:
                return pair
            store = host_store(self.host, self.timeout_s)
            address = ChannelAddress(self.host, store.port, f"kv/{uuid.uuid4().hex}/", backend)
            building = asyncio.ensure_future(asyncio.to_thread(_Pair, address, SENDER, store, self.node,
                                                               self.timeout_s))
            try:
                await asyncio.gather(building, join(address))
            except BaseException:
                building.cancel()  # the thread itself ends at the store's timeout
                raise
            self._senders[peer] = pair = building.result()
            self.num_groups_built += 1
            return pair

    # ---- receiver --------------------------------------------------------------------------------------
    async def join(self, peer: str, address: ChannelAddress) -> None:
        """Joins the group `peer` (the sender) set up; replaces any older group from it."""
        self._receivers.pop(peer, None)

        def build() -> _Pair:
            return _Pair(address, RECEIVER, join_store(address, self.timeout_s), self.node, self.timeout_s)

        self._receivers[peer] = await asyncio.to_thread(build)
        self.num_groups_built += 1

    async def receive(self, peer: str, header: StageHeader) -> KVStage:
        pair = self._receivers.get(peer)
        if pair is None:
            raise ConnectionError(f"no KV channel from {peer}: it must join first")
        device = self.device if pair.backend == "nccl" else torch.device("cpu")  # gloo: the sender's were on the host
        flat = torch.empty(header.numel, dtype=getattr(torch, header.dtype), device=device)
        async with pair.lock:
            try:
                await asyncio.to_thread(pair.recv, flat, header.tag)
            except BaseException:
                self._receivers.pop(peer, None)
                raise
        return unpack(header, flat)

    def peer_nodes(self) -> dict[str, tuple[str, bool]]:
        """{peer replica: (its Ray node id, whether the group stays on loopback)} for every live group."""
        pairs = {**self._receivers, **self._senders}
        return {peer: (pair.peer_node_id, pair.is_local) for peer, pair in sorted(pairs.items())}

    def close(self) -> None:
        self._senders.clear()
        self._receivers.clear()
