"""Replica-to-replica calls for migration through Ray Serve: `ServeHandlePeer`.

A replica calls `LLMServer.migration_*` on one specific replica of its own deployment through a
DeploymentHandle; every such call carries `target_replica=<replica id>` as a keyword argument, and
`KVHeadroomRouter` sends a request that names a target to that replica only (deployments/router.py). The KV
stages and the snapshot travel as call arguments, i.e. through Ray's object store (arguments over 100 KiB
are put there): the transport for CPUs and a single node. On GPUs a `torch.distributed` send/recv between
the two replicas' ranks (NCCL) would move the bulk instead, with these calls as the control channel
(not implemented: see docs/MIGRATION.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from deployments.migration import MigrationPeer
from engine.migration import KVStage, RequestSnapshot

TARGET_KWARG = "target_replica"


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

    async def adopt(self, target: str, snapshot: RequestSnapshot, tail: KVStage | None,
                    num_kv_tokens: int) -> AsyncIterator[Any]:
        handle = self._deployment().options(stream=True)
        response = handle.migration_adopt.remote(snapshot, tail, num_kv_tokens, **{TARGET_KWARG: target})
        finished = False
        try:
            async for item in response:
                yield item
            finished = True
        finally:
            if not finished:
                with contextlib.suppress(Exception):
                    response.cancel()
