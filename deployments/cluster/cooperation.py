"""KunServe on a Serve replica: carrying out the controller's `LayerOrder`s (drop_coordinator.py).

Drop, as the pair's leader (the replica that keeps the first layers): host a store for a new two-rank
group (gloo on CPU, NCCL on GPU; built like the migration's KV channels, deployments/migration/
kv_channel.py) and, at once, ask the follower through a targeted Serve call (`LLMServer.cooperation_join`,
the migration's control channel) to join it. The follower joins, forms its side on its engine thread
(hands its requests in flight to the leader, drops its first layers, offers its free KV) and answers;
then the leader forms its side. From then on both AsyncEngine loops are driven by the pair
(engine/cooperative/remote.py, follower.py): the follower's clients keep streaming from it. Each side
watches the other with a heartbeat through the pair's store (engine/cooperative/heartbeat.py): a peer that
hangs is lost after `parameter_dropping.peer_hang_s`, not at the group's timeout.

Grow, as the leader (the plan's order to drop more while the pair stays under pressure): on the leader's
engine thread, between two steps, over the pair's group (engine/cooperative/remote.py `RemoteLeader.grow`).

Restore, as the leader: the pair dissolves from the leader's engine thread (the follower hears it over
the group). A follower's own orders need no action (the leader drives both); a restore ordered to a
replica whose peer is gone is already done by the pair itself when its group failed (`PeerLost`): the
survivor restored from its host copy.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from deployments.cluster.placement import NodeAddress
from deployments.migration.kv_channel import ChannelAddress, backend_for, host_store, join_store, open_group
from deployments.telemetry import DropStatus, LayerOrder
from engine.api import EngineStats
from engine.cooperative.channel import PairChannel
from engine.cooperative.follower import RemoteFollower
from engine.cooperative.remote import RemoteLeader

logger = logging.getLogger("ray.serve")

JoinCall = Callable[[str, ChannelAddress, int, int], Awaitable[None]]  # (follower, address, first_keeps, second_from)


class Cooperation:
    def __init__(self, replica_id: str, engine, node: NodeAddress, join: JoinCall, timeout_s: float = 30.0,
                 num_micro_batches: int = 2, min_micro_batch_tokens: int = 64, hang_after_s: float = 3.0):
        """`engine`: the replica's AsyncEngine; `join(follower, address, first_keeps, second_from)` calls
        `cooperation_join` on the follower replica; `hang_after_s`: a peer silent this long (no heartbeat) is
        lost, well before the group's `timeout_s`."""
        self.hang_after_s = hang_after_s
        self.replica_id = replica_id
        self.engine = engine
        self.node = node
        self._join = join
        self.timeout_s = timeout_s
        self.num_micro_batches = num_micro_batches
        self.min_micro_batch_tokens = min_micro_batch_tokens
        self.peer: str | None = None
        self._groups: list = []  # the live group (and its store) of the current pair
        self._busy = asyncio.Lock()

    def status(self, stats: EngineStats) -> DropStatus:
        llm = self.engine.engine
        arena = llm.rank.arena
        driver = self.engine.driver
        peer = self.peer if driver is not None and driver.is_formed else None
        # KV chunks of a new request of n tokens: pure arithmetic on the KV layout, safe off the engine thread
        peak = sum(llm.kv.chunks_to_grow(None, tokens) for tokens in self.engine.peak_tokens())
        return DropStatus(llm.model_name, llm.model_config.num_layers, arena.layer_chunks([0]), stats.drop_state,
                          peer, len(arena.dropped_layers), stats.ttft_growth, llm.kv_capacity_chunks(), peak)

    async def follow(self, order: LayerOrder) -> None:
        async with self._busy:
            driver = self.engine.driver
            if order.action == "drop" and order.role == "leader" and driver is None:
                await self._lead(order)
            elif order.action == "grow" and isinstance(driver, RemoteLeader) and driver.is_formed:
                freed = await self.engine.run_in_engine(lambda _: driver.grow(order.first_keeps, order.second_from))
                logger.info("replica %s: pair with %s grew its drop, keeps [0, %d), the follower [%d, L) (%d chunks "
                            "freed here)", self.replica_id, self.peer, order.first_keeps, order.second_from, freed)
            elif order.action == "restore" and isinstance(driver, RemoteLeader) and driver.is_formed:
                restored = await self.engine.run_in_engine(lambda _: driver.restore())
                logger.info("replica %s: pair with %s restored (%d chunks back)", self.replica_id, self.peer, restored)
                self._end()
            else:
                logger.info("replica %s: layer order %s needs nothing here", self.replica_id, order)

    async def _lead(self, order: LayerOrder) -> None:
        started = time.monotonic()
        store = host_store(self.node.host, self.timeout_s)
        address = ChannelAddress(self.node.host, store.port, f"pair/{uuid.uuid4().hex}/",
                                 backend_for(self.engine.engine.model.embed.device))
        building = asyncio.ensure_future(asyncio.to_thread(open_group, address, PairChannel.LEADER, store, self.node,
                                                           self.timeout_s))
        try:
            await asyncio.gather(building, self._join(order.peer, address, order.first_keeps, order.second_from))
        except BaseException:
            building.cancel()  # the thread ends at the store's timeout
            raise
        group = building.result()
        joined = time.monotonic()
        self._groups = [group, store]
        channel = await self._channel(group, address, PairChannel.LEADER)
        leader = RemoteLeader(self.engine.engine, channel, self.num_micro_batches, self.min_micro_batch_tokens)
        freed = await self.engine.cooperate(leader, lambda: leader.form(order.first_keeps, order.second_from))
        self.peer = order.peer
        logger.info("replica %s: leads a pair with %s, keeps layers [0, %d) (%d chunks freed); formed in %.2f s "
                    "(the group and the follower's side %.2f s, this side %.2f s)", self.replica_id, order.peer,
                    order.first_keeps, freed, time.monotonic() - started, joined - started,
                    time.monotonic() - joined)

    async def join(self, leader: str, address: ChannelAddress, first_keeps: int, second_from: int) -> None:
        """The follower's side of forming a pair (called by the leader through Serve)."""
        async with self._busy:
            if self.engine.driver is not None:
                raise RuntimeError(f"replica {self.replica_id} is already in a pair")
            started = time.monotonic()
            group = await asyncio.to_thread(lambda: open_group(address, PairChannel.FOLLOWER,
                                                               join_store(address, self.timeout_s), self.node,
                                                               self.timeout_s))
            self._groups = [group]
            opened = time.monotonic()
            follower = RemoteFollower(self.engine.engine, await self._channel(group, address, PairChannel.FOLLOWER))
            freed = await self.engine.cooperate(follower, lambda: follower.form(first_keeps, second_from))
            self.peer = leader
            logger.info("replica %s: follows %s, keeps layers [%d, L) (%d chunks freed); group %.2f s, this side "
                        "%.2f s", self.replica_id, leader, second_from, freed, opened - started,
                        time.monotonic() - opened)

    async def _channel(self, group, address: ChannelAddress, rank: int) -> PairChannel:
        """The pair's channel over `group`, watching the peer with a heartbeat through a store client of its own."""
        channel = PairChannel(group.group, rank)
        channel.watch(await asyncio.to_thread(join_store, address, self.timeout_s), hang_after_s=self.hang_after_s)
        return channel

    def _end(self) -> None:
        self.peer = None
        self._groups = []
