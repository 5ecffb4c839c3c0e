"""KunServe on a Serve replica: carrying out the controller's `LayerOrder`s (drop_coordinator.py).

Drop: both replicas of the new pair get the order, each in the reply to its own next report, with where
they meet (`PairRendezvous`: the leader's store, which every replica hosts from its start and reports in
its `DropStatus`, and a key prefix new to the pair). Each side starts at once, neither waits for a call
from the other: both join a two-rank group under that prefix (gloo on CPU, NCCL on GPU; built like the
migration's KV channels, deployments/migration/kv_channel.py); the follower forms its side on its engine
thread (hands its requests in flight to the leader, drops its first layers, offers its free KV) and says
so over the group ("formed", or "failed" with why); the leader waits for that off its engine thread, then
forms its side. (Forming used to start with the leader calling the follower through a targeted Serve
call: under a spike that call took 0.7-1.6 s to arrive, longer than the forming itself.) From then on
both AsyncEngine loops are driven by the pair (engine/cooperative/remote.py, follower.py): the follower's
clients keep streaming from it. Each side watches the other with a heartbeat through the pair's store
(engine/cooperative/heartbeat.py): a peer that hangs is lost after `parameter_dropping.peer_hang_s`, not
at the group's timeout.

Grow, as the leader (the plan's order to drop more while the pair stays under pressure): on the leader's
engine thread, between two steps, over the pair's group (engine/cooperative/remote.py `RemoteLeader.grow`).

Restore, as the leader: the pair dissolves from the leader's engine thread (the follower hears it over
the group). A follower's grow or restore order needs no action (the leader drives both); a restore ordered
to a replica whose peer is gone is already done by the pair itself when its group failed (`PeerLost`): the
survivor restored from its host copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from deployments.cluster.placement import NodeAddress
from deployments.migration.kv_channel import ChannelAddress, backend_for, host_store, join_store, open_group
from deployments.telemetry import DropStatus, LayerOrder, PairRendezvous
from engine.api import EngineStats
from engine.cooperative.channel import PairChannel
from engine.cooperative.follower import RemoteFollower
from engine.cooperative.remote import RemoteLeader

logger = logging.getLogger("ray.serve")


class Cooperation:
    def __init__(self, replica_id: str, engine, node: NodeAddress, timeout_s: float = 30.0,
                 num_micro_batches: int = 2, min_micro_batch_tokens: int = 64, hang_after_s: float = 3.0):
        """`engine`: the replica's AsyncEngine; `hang_after_s`: a peer silent this long (no heartbeat) is lost,
        well before the group's `timeout_s`."""
        self.hang_after_s = hang_after_s
        self.replica_id = replica_id
        self.engine = engine
        self.node = node
        self.timeout_s = timeout_s
        self.num_micro_batches = num_micro_batches
        self.min_micro_batch_tokens = min_micro_batch_tokens
        self.peer: str | None = None
        self._store = host_store(node.host, timeout_s)  # where the pairs this replica leads meet
        self._groups: list = []  # the live group of the current pair
        self._busy = asyncio.Lock()

    def status(self, stats: EngineStats) -> DropStatus:
        llm = self.engine.engine
        arena = llm.rank.arena
        driver = self.engine.driver
        peer = self.peer if driver is not None and driver.is_formed else None
        return DropStatus(llm.model_name, llm.model_config.num_layers, arena.layer_chunks([0]), stats.drop_state,
                          peer, len(arena.dropped_layers), stats.ttft_growth, self.kv_capacity_chunks(),
                          self.client_peak_chunks(), (self.node.host, self._store.port))

    def client_peak_chunks(self) -> int:
        """The KV this replica's clients' live requests hold at their last possible tokens, from their arrival.
        (KV chunks of a request of n tokens: pure arithmetic on the KV layout, safe off the engine thread.)"""
        kv = self.engine.engine.kv
        return sum(kv.chunks_to_grow(None, tokens) for tokens in self.engine.peak_tokens())

    def kv_capacity_chunks(self) -> int:
        """What KV could ever hold here (LLMEngine.kv_capacity_chunks; dropped layers' chunks included)."""
        return self.engine.engine.kv_capacity_chunks()

    async def follow(self, order: LayerOrder) -> None:
        async with self._busy:
            driver = self.engine.driver
            if order.action == "drop" and driver is None and order.rendezvous is not None:
                await (self._lead(order) if order.role == "leader" else self._join(order))
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
        address = self._address(order.rendezvous)
        group = await asyncio.to_thread(open_group, address, PairChannel.LEADER, self._store, self.node,
                                        self.timeout_s)
        self._groups = [group]
        opened = time.monotonic()
        try:
            channel = await self._channel(group, address, PairChannel.LEADER)
            formed = await asyncio.to_thread(channel.recv_object)  # the follower's side, formed (or why not)
            joined = time.monotonic()
            leader = RemoteLeader(self.engine.engine, channel, self.num_micro_batches, self.min_micro_batch_tokens)
            freed = await self.engine.cooperate(leader, lambda: leader.form(order.first_keeps, order.second_from,
                                                                            formed))
        except BaseException:
            self._end()
            raise
        self.peer = order.peer
        logger.info("replica %s: leads a pair with %s, keeps layers [0, %d) (%d chunks freed); formed in %.2f s "
                    "(the group %.2f s, then the follower's side %.2f s, this side %.2f s)", self.replica_id,
                    order.peer, order.first_keeps, freed, time.monotonic() - started, opened - started,
                    joined - opened, time.monotonic() - joined)

    async def _join(self, order: LayerOrder) -> None:
        """The follower's side of forming a pair: says "formed" (or "failed", with why) to the leader."""
        started = time.monotonic()
        address = self._address(order.rendezvous)
        group = await asyncio.to_thread(lambda: open_group(address, PairChannel.FOLLOWER,
                                                           join_store(address, self.timeout_s), self.node,
                                                           self.timeout_s))
        self._groups = [group]
        opened = time.monotonic()
        channel = await self._channel(group, address, PairChannel.FOLLOWER)
        follower = RemoteFollower(self.engine.engine, channel)
        try:
            freed = await self.engine.cooperate(follower, lambda: follower.form(order.first_keeps, order.second_from))
        except BaseException as exc:
            with contextlib.suppress(Exception):  # the leader waits for an answer: not for its group's timeout
                await asyncio.to_thread(channel.send_object, ("failed", repr(exc), ()))
            self._end()
            raise
        self.peer = order.peer
        logger.info("replica %s: follows %s, keeps layers [%d, L) (%d chunks freed); group %.2f s, this side "
                    "%.2f s", self.replica_id, order.peer, order.second_from, freed, opened - started,
                    time.monotonic() - opened)

    def _address(self, meet: PairRendezvous) -> ChannelAddress:
        return ChannelAddress(meet.host, meet.port, meet.name, backend_for(self.engine.engine.model.embed.device))

    async def _channel(self, group, address: ChannelAddress, rank: int) -> PairChannel:
        """The pair's channel over `group`, watching the peer with a heartbeat through a store client of its own."""
        channel = PairChannel(group.group, rank)
        channel.watch(await asyncio.to_thread(join_store, address, self.timeout_s), hang_after_s=self.hang_after_s)
        return channel

    def _end(self) -> None:
        self.peer = None
        self._groups = []
