"""deployments/migration/kv_channel.py: KV stages over torch.distributed point-to-point (gloo on 127.0.0.1).

Two `KVChannels` in one process stand for two replicas (gloo talks TCP either way); `join` and `deliver`,
the control calls Serve would carry, call the other side directly."""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.migration.kv_channel import KVChannels, pack, unpack
from engine.migration import KVStage

pytestmark = pytest.mark.timeout(120)


def stage(start: int, end: int, seed: int) -> KVStage:
    """Two layers of different shapes (a heterogeneous model: 3 KV heads of 8, then 1 of 16)."""
    generator = torch.Generator().manual_seed(seed)
    n = end - start

    def randn(*shape):
        return torch.randn(n, *shape, generator=generator)

    return KVStage(start, end, [(randn(3, 8), randn(3, 8)), (randn(1, 16), randn(1, 16))])


def assert_same(a: KVStage, b: KVStage) -> None:
    assert (a.start, a.end, len(a.layers)) == (b.start, b.end, len(b.layers))
    for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True):
        assert torch.equal(ka, kb) and torch.equal(va, vb)


def test_pack_and_unpack_round_trip_mixed_layer_shapes():
    original = stage(16, 40, seed=0)
    header, flat = pack(original, tag=7)
    assert header.tag == 7 and header.numel == flat.numel() == 24 * (2 * 3 * 8 + 2 * 16)
    assert_same(unpack(header, flat.clone()), original)


class Pair:
    """Sender A and receiver B; `fail_next_delivery` makes B's next receive call fail before it receives."""

    def __init__(self):
        self.a = KVChannels("127.0.0.1", timeout_s=10.0)
        self.b = KVChannels("127.0.0.1", timeout_s=10.0)
        self.received: list[KVStage] = []
        self.fail_next_delivery = False

    async def join(self, address) -> None:
        await self.b.join("A", address)

    async def deliver(self, header) -> None:
        if self.fail_next_delivery:
            self.fail_next_delivery = False
            raise ConnectionError("destination lost the call")
        self.received.append(await self.b.receive("A", header))

    async def send(self, kv: KVStage) -> None:
        await asyncio.wait_for(self.a.send("B", kv, self.join, self.deliver), 30)


def test_stages_arrive_intact_over_one_group():
    pair = Pair()
    stages = [stage(0, 32, 1), stage(32, 40, 2), stage(40, 41, 3)]

    async def scenario():
        for kv in stages:
            await pair.send(kv)

    asyncio.run(scenario())
    for sent, received in zip(stages, pair.received, strict=True):
        assert_same(received, sent)
    assert (pair.a.num_groups_built, pair.b.num_groups_built) == (1, 1)  # built once, reused


def test_a_failed_transfer_drops_the_group_and_the_next_one_builds_a_fresh_one():
    pair = Pair()

    async def scenario():
        await pair.send(stage(0, 8, 1))
        pair.fail_next_delivery = True
        with pytest.raises(ConnectionError):
            await pair.send(stage(8, 16, 2))
        await pair.send(stage(8, 16, 3))

    asyncio.run(scenario())
    assert len(pair.received) == 2
    assert_same(pair.received[1], stage(8, 16, 3))
    assert pair.a.num_groups_built == 2 and pair.b.num_groups_built == 2


def test_receiving_without_a_group_is_a_clear_error():
    channels = KVChannels("127.0.0.1")
    header, _ = pack(stage(0, 4, 0), tag=1)
    with pytest.raises(ConnectionError, match="must join first"):
        asyncio.run(channels.receive("nobody", header))
