"""The destination side of a live migration: `MigrationEndpoint`, one per replica.

The source's `MigrationManager` (deployments/migration/source.py) calls reserve / write_kv / adopt / cancel through
a `MigrationPeer`; with the torch_distributed transport also `join` (the source's point-to-point group) and
`receive_kv` (deployments/migration/kv_channel.py). Reservations nobody adopts within `timeout_s` are freed (the source
died before the commit).

After the commit a *pump* task, not the adopt call, reads the request's engine stream and hands its outputs
to the adopt stream. A source whose client left says so with `cancel`, which stops the pump and aborts the
request. If the adopt stream's consumer vanishes without a cancel — the source replica died after the
commit — the request runs to its end here all the same: it is *orphaned*, its output tokens are kept in
`finished_orphans` (the last 64) and counted in `MigrationStats.num_orphans_finished`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deployments.migration.kv_channel import ChannelAddress, KVChannels, StageHeader
from deployments.migration.relay import MIGRATED, RelayRegistry
from deployments.migration.source import COMMITTED, AdoptStream, MigrationConfig, MigrationStats
from engine import migration
from engine.api import EngineClient, RequestOutput
from engine.migration import KVStage, MigrationError, RequestSnapshot

if TYPE_CHECKING:
    from engine.core.engine import LLMEngine

logger = logging.getLogger("ray.serve")
NUM_ORPHANS_KEPT = 64
_END = object()


@dataclass
class _Reservation:
    num_tokens: int
    reserved_at: float
    written_end: int = 0


@dataclass
class _Adopted:
    """A committed request: its pump task and the outputs waiting for the adopt stream."""

    request_id: str
    token_ids: list[int]  # all output tokens so far (the source's, then ours)
    outputs: asyncio.Queue = field(default_factory=asyncio.Queue)
    pump: asyncio.Task | None = None
    is_orphaned: bool = False
    is_cancelled: bool = False


class MigrationEndpoint:
    def __init__(self, engine: EngineClient, config: MigrationConfig, stats: MigrationStats,
                 relays: RelayRegistry | None = None, channels: KVChannels | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self._engine = engine
        self._config = config
        self._stats = stats
        self._relays = relays
        self._channels = channels
        self._clock = clock
        self._reserved: dict[str, _Reservation] = {}
        self._adopted: dict[str, _Adopted] = {}
        self.finished_orphans: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    # ---- before the commit -------------------------------------------------------------------------
    async def reserve(self, request_id: str, num_tokens: int) -> bool:
        await self.expire_stale()
        busy = request_id in self._reserved or request_id in self._adopted
        if len(self._reserved) >= self._config.max_concurrent or busy:
            self._stats.num_incoming_refused += 1
            return False
        if not await self._engine.run_in_engine(migration.reserve, request_id, num_tokens):
            self._stats.num_incoming_refused += 1
            return False
        self._reserved[request_id] = _Reservation(num_tokens, self._clock())
        return True

    def _checked(self, request_id: str, stage: KVStage) -> _Reservation:
        reservation = self._reserved.get(request_id)
        if reservation is None:
            raise MigrationError(f"no reservation for {request_id} here")
        if stage.start != reservation.written_end or stage.end > reservation.num_tokens:
            raise MigrationError(f"stage [{stage.start}, {stage.end}) does not follow [0, {reservation.written_end})"
                                 f" within the {reservation.num_tokens} reserved tokens")
        return reservation

    async def write_kv(self, request_id: str, stage: KVStage) -> None:
        reservation = self._checked(request_id, stage)
        await self._engine.run_in_engine(migration.write_kv, request_id, stage)
        reservation.written_end = stage.end

    async def join(self, source: str, address: ChannelAddress) -> None:
        await self._kv_channels().join(source, address)

    async def receive_kv(self, request_id: str, header: StageHeader, source: str) -> None:
        await self.write_kv(request_id, await self._kv_channels().receive(source, header))

    def _kv_channels(self) -> KVChannels:
        if self._channels is None:
            raise MigrationError("this replica has no KV channels (transport torch_distributed)")
        return self._channels

    async def cancel(self, request_id: str) -> None:
        """Frees a reservation, or stops an adopted request whose source gave it up (its client left)."""
        adopted = self._adopted.get(request_id)
        if adopted is not None:
            adopted.is_cancelled = True
            adopted.pump.cancel()
            with contextlib.suppress(BaseException):
                await adopted.pump
            return
        self._reserved.pop(request_id, None)
        await self._engine.run_in_engine(migration.cancel, request_id)

    async def expire_stale(self) -> None:
        now = self._clock()
        for request_id, reservation in list(self._reserved.items()):
            if now - reservation.reserved_at > self._config.timeout_s:
                logger.warning("migration of %s: reservation never adopted; freed", request_id)
                await self.cancel(request_id)

    # ---- the commit ------------------------------------------------------------------------------------
    async def adopt(self, snapshot: RequestSnapshot, tail: KVStage | None, num_kv_tokens: int) -> AdoptStream:
        """Writes the tail, attaches the request (commit), yields COMMITTED, then its outputs."""
        request_id = snapshot.request_id
        if tail is not None:
            self._checked(request_id, tail)
        elif request_id not in self._reserved:
            raise MigrationError(f"no reservation for {request_id} here")
        written = tail.end if tail is not None else self._reserved[request_id].written_end
        if num_kv_tokens and written != num_kv_tokens:
            raise MigrationError(f"{written} KV tokens written, {num_kv_tokens} announced")
        loop = asyncio.get_running_loop()
        committed = asyncio.Event()

        def write_and_attach(engine: LLMEngine, snapshot: RequestSnapshot, tail: KVStage | None,
                             num_kv_tokens: int) -> None:
            if tail is not None:
                migration.write_kv(engine, request_id, tail)
            migration.attach(engine, snapshot, num_kv_tokens)
            loop.call_soon_threadsafe(committed.set)

        stream = self._engine.stream_attached(request_id, write_and_attach, snapshot, tail, num_kv_tokens)
        first = asyncio.ensure_future(anext(stream))
        waiter = asyncio.ensure_future(committed.wait())
        try:
            await asyncio.wait({first, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if not committed.is_set():
                await first  # attach failed: raises its error
        except BaseException:
            await self._close(stream, first)
            self._reserved.pop(request_id, None)
            with contextlib.suppress(Exception):
                await self._engine.run_in_engine(migration.cancel, request_id)
            raise
        finally:
            waiter.cancel()
        self._reserved.pop(request_id, None)
        self._stats.num_adopted += 1
        adopted = self._adopted[request_id] = _Adopted(request_id, list(snapshot.output_token_ids))
        adopted.pump = asyncio.ensure_future(self._pump(adopted, stream, first))
        try:
            yield COMMITTED
            while (item := await adopted.outputs.get()) is not _END:
                yield item
        finally:
            if not adopted.pump.done() and not adopted.is_cancelled:
                adopted.is_orphaned = True
                logger.warning("migration of %s: the source went away after the commit; finishing it here",
                               request_id)

    async def _pump(self, adopted: _Adopted, stream: AsyncIterator[RequestOutput], first: asyncio.Future) -> None:
        """Moves the engine's outputs (after a further migration, that replica's, relayed) to the adopt stream."""
        finished = False
        try:
            async for output in self._outputs(adopted.request_id, stream, first):
                adopted.token_ids.extend(output.new_token_ids)
                finished = output.is_finished
                if not adopted.is_orphaned:
                    adopted.outputs.put_nowait(output)
        except Exception as exc:  # noqa: BLE001 - ends the stream with an error output, never silently
            adopted.outputs.put_nowait(RequestOutput(adopted.request_id, (), "", finish_reason="error",
                                                     error=f"migrated request failed here: {exc!r}"))
        finally:
            await self._close(stream, first)
            adopted.outputs.put_nowait(_END)
            self._adopted.pop(adopted.request_id, None)
            if adopted.is_orphaned and finished:
                self._stats.num_orphans_finished += 1
                self.finished_orphans[adopted.request_id] = tuple(adopted.token_ids)
                while len(self.finished_orphans) > NUM_ORPHANS_KEPT:
                    self.finished_orphans.popitem(last=False)

    async def _outputs(self, request_id: str, stream: AsyncIterator[RequestOutput],
                       first: asyncio.Future) -> AsyncIterator[RequestOutput]:
        output = await first
        while True:
            if output.finish_reason == MIGRATED:  # it moved on from here: forward the next replica's outputs
                async for relayed in self._relayed(request_id):
                    yield relayed
                return
            yield output
            if output.is_finished:
                return
            output = await anext(stream)

    @staticmethod
    async def _close(stream: AsyncIterator[RequestOutput], first: asyncio.Future) -> None:
        """Ends our pull on the engine stream; an unfinished stream's own clean-up aborts the request."""
        if not first.done():
            first.cancel()
        with contextlib.suppress(BaseException):
            await first
        with contextlib.suppress(BaseException):
            await stream.aclose()

    async def _relayed(self, request_id: str) -> AsyncIterator[RequestOutput]:
        relay = self._relays.take(request_id) if self._relays is not None else None
        if relay is None:
            yield RequestOutput(request_id, (), "", finish_reason="error", error="relay missing after a migration")
            return
        async for output in relay.start(None):
            yield output

    async def shutdown(self) -> None:
        for adopted in list(self._adopted.values()):
            await self.cancel(adopted.request_id)
