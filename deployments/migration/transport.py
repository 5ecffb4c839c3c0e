"""Replica-to-replica calls for migration through Ray Serve: `ServeHandlePeer`.

A replica calls `LLMServer.migration_*` on one specific replica of its own deployment through a
DeploymentHandle; every such call carries `target_replica=<replica id>` as a keyword argument, and
`KVHeadroomRouter` sends a request that names a target to that replica only (deployments/cluster/router.py). The KV
stages and the snapshot travel as call arguments, i.e. through Ray's object store (arguments over 100 KiB
are put there): the transport for CPUs and a single node. `CollectivePeer` keeps these calls as the control
channel and moves the KV with `torch.distributed` send/recv between the two replicas (gloo on CPU, NCCL
between GPUs; deployments/migration/kv_channel.py). `make_peer` picks one by its name
(`migration.transport` in the config).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from deployments.cluster.ranking import TARGET_KWARG
from deployments.migration.kv_channel import ChannelAddress, KVChannels, StageHeader
from deployments.migration.source import AdoptStream, MigrationPeer
from engine.migration import KVStage, RequestSnapshot


class ServeHandlePeer(MigrationPeer):
    name = "ray_object_store"

    def __init__(self, deployment_name: str, app_name: str):
        self._deployment_name = deployment_name
        self._app_name = app_name
        self._handle = None

    def _deployment(self):
        if self._handle is None:
            from ray import serve

            self._handle = serve.get_deployment_handle(self._deployment_name, self._app_name)
        return self._handle

    async def _call(self, method: str, target: str, *args: Any) -> Any:
        response = getattr(self._deployment(), method).remote(*args, **{TARGET_KWARG: target})
        try:
            return await response
        except BaseException:
            response.cancel()  # a timed-out call must not run later on the destination
            raise

    async def reserve(self, target: str, request_id: str, num_tokens: int) -> bool:
        return await self._call("migration_reserve", target, request_id, num_tokens)

    async def write_kv(self, target: str, request_id: str, stage: KVStage) -> None:
        await self._call("migration_write", target, request_id, stage)

    async def cancel(self, target: str, request_id: str) -> None:
        await self._call("migration_cancel", target, request_id)

    async def _stream(self, method: str, target: str, *args: Any) -> AsyncIterator[Any]:
        response = getattr(self._deployment().options(stream=True), method).remote(*args, **{TARGET_KWARG: target})
        finished = False
        try:
            async for item in response:
                yield item
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    response.cancel()

    def adopt(self, target: str, snapshot: RequestSnapshot, tail: KVStage | None,
              num_kv_tokens: int) -> AdoptStream:
        return self._stream("migration_adopt", target, snapshot, tail, num_kv_tokens)


class CollectivePeer(ServeHandlePeer):
    """KV over a point-to-point process group per (source, destination) pair; the rest as ServeHandlePeer.
    The destination's `migration_connect` joins the group, `migration_receive` receives a stage and writes
    it. The tail goes the same way, just before the adopt call."""

    name = "torch_distributed"

    def __init__(self, deployment_name: str, app_name: str, replica_id: str, channels: KVChannels):
        super().__init__(deployment_name, app_name)
        self._replica_id = replica_id
        self._channels = channels

    async def write_kv(self, target: str, request_id: str, stage: KVStage) -> None:
        async def join(address: ChannelAddress) -> None:
            await self._call("migration_connect", target, self._replica_id, address)

        async def deliver(header: StageHeader) -> None:
            await self._call("migration_receive", target, request_id, header, self._replica_id)

        await self._channels.send(target, stage, join, deliver)

    async def adopt(self, target: str, snapshot: RequestSnapshot, tail: KVStage | None,
                    num_kv_tokens: int) -> AdoptStream:
        if tail is not None and tail.end > tail.start:
            await self.write_kv(target, snapshot.request_id, tail)
        async for item in self._stream("migration_adopt", target, snapshot, None, num_kv_tokens):
            yield item


def make_peer(transport: str, deployment_name: str, app_name: str, replica_id: str,
              channels: KVChannels) -> MigrationPeer:
    """The transport named by `migration.transport` (after "auto" is resolved)."""
    if transport == CollectivePeer.name:
        return CollectivePeer(deployment_name, app_name, replica_id, channels)
    if transport == ServeHandlePeer.name:
        return ServeHandlePeer(deployment_name, app_name)
    raise ValueError(f"unknown migration transport {transport!r}")
