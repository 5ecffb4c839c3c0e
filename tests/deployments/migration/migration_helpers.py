"""In-process stand-ins for the migration transport: destinations reached by replica id without Ray.

`LocalPeer` pickles what it sends (as the object store would) and calls the destination's
`MigrationEndpoint` directly. `InProcessCollectivePeer` is the real torch_distributed transport
(`CollectivePeer`: KV over gloo between the two sides' `KVChannels`) with its control calls made in-process
instead of through Serve. `FailingPeer`, `HangingPeer` and `DeadSourcePeer` are the faults the abort-path
tests pass in; `SlowPeer` a slow link.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from typing import Any

from deployments.migration.endpoint import MigrationEndpoint
from deployments.migration.kv_channel import KVChannels
from deployments.migration.source import MigrationPeer
from deployments.migration.transport import CollectivePeer


def _over_the_wire(value):
    return pickle.loads(pickle.dumps(value))


class LocalPeer(MigrationPeer):
    name = "local"

    def __init__(self, endpoints: dict[str, MigrationEndpoint]):
        self.endpoints = endpoints
        self.calls: list[tuple[str, str]] = []

    async def reserve(self, target: str, request_id: str, num_tokens: int) -> bool:
        self.calls.append(("reserve", target))
        return await self.endpoints[target].reserve(request_id, num_tokens)

    async def write_kv(self, target: str, request_id: str, stage) -> None:
        self.calls.append(("write_kv", target))
        await self.endpoints[target].write_kv(request_id, _over_the_wire(stage))

    async def adopt(self, target: str, snapshot, tail, num_kv_tokens: int) -> AsyncIterator[Any]:
        self.calls.append(("adopt", target))
        async for item in self.endpoints[target].adopt(_over_the_wire(snapshot), _over_the_wire(tail),
                                                       num_kv_tokens):
            yield _over_the_wire(item)

    async def cancel(self, target: str, request_id: str) -> None:
        self.calls.append(("cancel", target))
        await self.endpoints[target].cancel(request_id)


class FailingPeer(LocalPeer):
    """The destination breaks on the `fail_at`-th KV write (it did reserve)."""

    def __init__(self, endpoints, fail_at: int = 1):
        super().__init__(endpoints)
        self.fail_at = fail_at
        self.num_writes = 0

    async def write_kv(self, target, request_id, stage) -> None:
        self.num_writes += 1
        if self.num_writes >= self.fail_at:
            raise ConnectionError("destination replica died")
        await super().write_kv(target, request_id, stage)


class SlowPeer(LocalPeer):
    """Every KV write takes `write_s` seconds (a slow link, or a busy destination)."""

    def __init__(self, endpoints, write_s: float):
        super().__init__(endpoints)
        self.write_s = write_s

    async def write_kv(self, target, request_id, stage) -> None:
        await asyncio.sleep(self.write_s)
        await super().write_kv(target, request_id, stage)


class HangingPeer(LocalPeer):
    """The destination reserves, takes the KV, then never answers the adopt call."""

    async def adopt(self, target, snapshot, tail, num_kv_tokens) -> AsyncIterator[Any]:
        self.calls.append(("adopt", target))
        await asyncio.Event().wait()
        yield None  # pragma: no cover


class DeadSourcePeer(LocalPeer):
    """After the commit the source can no longer reach the destination (it died): its cancel never arrives."""

    async def cancel(self, target, request_id) -> None:
        self.calls.append(("cancel", target))
        raise ConnectionError("source replica died")


ENDPOINT_METHODS = {"migration_reserve": "reserve", "migration_write": "write_kv", "migration_cancel": "cancel",
                    "migration_connect": "join", "migration_receive": "receive_kv", "migration_adopt": "adopt"}


class InProcessCollectivePeer(CollectivePeer):
    def __init__(self, endpoints: dict[str, MigrationEndpoint], channels: KVChannels, replica_id: str = "A"):
        super().__init__("unused", "unused", replica_id, channels)
        self.endpoints = endpoints
        self.calls: list[tuple[str, str]] = []

    async def _call(self, method: str, target: str, *args: Any) -> Any:
        self.calls.append((method, target))
        return await getattr(self.endpoints[target], ENDPOINT_METHODS[method])(*_over_the_wire(args))

    async def _stream(self, method: str, target: str, *args: Any) -> AsyncIterator[Any]:
        self.calls.append((method, target))
        async for item in getattr(self.endpoints[target], ENDPOINT_METHODS[method])(*_over_the_wire(args)):
            yield _over_the_wire(item)
