"""Live migration of a running request from this replica (the source) to another (the destination).

Source, `MigrationManager` (one per replica; orders come from the cluster controller):
  1. the destination reserves a slot and pages for the request's tokens plus `growth_margin_tokens`;
  2. copy mode: the request is held at the reserved length (it waits there rather than outgrow the
     reservation); KV stages are copied while it keeps decoding (each stage only what is new) and
     sent, until a stage finds fewer than `min_stage_tokens` new tokens, `max_stages` were sent, or the
     request, growing as fast as during the last stage, would reach the reservation by the next one (and
     wait there);
  3. the request is paused and the KV tail copied, in one engine call;
  4. the destination writes the tail and attaches the request (its snapshot: tokens, sampling state and RNG,
     detokenizer state) and answers "committed"; with recompute mode no KV is sent and the destination
     recomputes it (Mell's adaptive choice: `choose_mode`, from measured bandwidth and prefill rate);
  5. the source registers a relay of the destination's outputs, frees the request and ends its local stream
     with "migrated": the HTTP handler goes on with the relay (deployments/migration/relay.py).
Any failure before the commit rolls back: the destination's stream is cancelled, the request resumes here,
the reservation is cancelled. The request is paused only after the destination reserved. A watchdog
(`timeout_s`) bounds a whole migration; at most `max_concurrent` run at once per replica, each way.

Destination: `MigrationEndpoint` (deployments/migration/endpoint.py), reached through a `MigrationPeer`, the
transport (deployments/migration/transport.py: Ray Serve handle calls, KV through the object store or
torch.distributed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.migration.config import MigrationConfig
from deployments.migration.relay import MIGRATED, Relay, RelayRegistry
from deployments.telemetry import ReplicaLoad, replica_load
from engine import migration
from engine.api import EngineClient, RequestOutput
from engine.host_split import HostRoom
from engine.migration import KVStage, MigrationError, RequestSnapshot

if TYPE_CHECKING:
    from engine.core.engine import LLMEngine

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Committed:
    """The first item of an adopt stream: the destination attached the request (the commit point)."""


COMMITTED = Committed()
AdoptStream = AsyncGenerator[Committed | RequestOutput, None]  # MigrationEndpoint.adopt: COMMITTED, then outputs


class MigrationAborted(Exception):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class MigrationStats:
    """This replica's migration counters (cumulative) for /metrics and the controller."""

    num_started: int = 0
    num_committed: int = 0
    num_aborted: Counter = field(default_factory=Counter)  # by reason
    num_by_mode: Counter = field(default_factory=Counter)  # committed, copy | recompute
    num_stages: int = 0
    bytes_moved: int = 0
    num_adopted: int = 0  # incoming, committed here
    num_incoming_refused: int = 0
    num_orphans_finished: int = 0  # adopted requests finished here after their source went away
    downtime_sum_s: float = 0.0
    num_downtimes: int = 0
    downtime_max_s: float = 0.0
    recent_downtimes_s: deque = field(default_factory=lambda: deque(maxlen=32))
    bandwidth_bytes_per_s: float = 0.0  # measured (moving average); 0 before the first transfer

    def record_downtime(self, seconds: float) -> None:
        self.downtime_sum_s += seconds
        self.num_downtimes += 1
        self.downtime_max_s = max(self.downtime_max_s, seconds)
        self.recent_downtimes_s.append(round(seconds, 4))

    def snapshot(self) -> dict[str, Any]:
        return {"started": self.num_started, "committed": self.num_committed,
                "aborted": sum(self.num_aborted.values()), "aborted_by_reason": dict(self.num_aborted),
                "copy": self.num_by_mode["copy"], "recompute": self.num_by_mode["recompute"],
                "stages": self.num_stages, "bytes_moved": self.bytes_moved, "adopted": self.num_adopted,
                "incoming_refused": self.num_incoming_refused, "orphans_finished": self.num_orphans_finished,
                "downtime_sum_s": round(self.downtime_sum_s, 4),
                "downtime_count": self.num_downtimes, "downtime_max_s": round(self.downtime_max_s, 4),
                "recent_downtimes_s": list(self.recent_downtimes_s),
                "bandwidth_bytes_per_s": round(self.bandwidth_bytes_per_s)}


class MigrationPeer(ABC):
    """How a source reaches a destination replica by id (the transport)."""

    name: str

    @abstractmethod
    async def reserve(self, target: str, request_id: str, num_tokens: int) -> bool: ...

    @abstractmethod
    async def write_kv(self, target: str, request_id: str, stage: KVStage) -> None: ...

    @abstractmethod
    def adopt(self, target: str, snapshot: RequestSnapshot, tail: KVStage | None,
              num_kv_tokens: int) -> AdoptStream:
        """The destination's `MigrationEndpoint.adopt` stream: COMMITTED, then RequestOutputs.
        Closing it cancels the destination's request."""

    @abstractmethod
    async def cancel(self, target: str, request_id: str) -> None: ...


def choose_mode(num_tokens: int, costs: dict[str, float], bandwidth_bytes_per_s: float) -> tuple[str, float, float]:
    """Mell's adaptive migration: copy the KV unless recomputing it on the destination is faster.
    Returns (mode, estimated copy seconds, estimated recompute seconds)."""
    copy_s = num_tokens * costs["kv_bytes_per_token"] / bandwidth_bytes_per_s
    num_steps = math.ceil(num_tokens / costs["max_num_batched_tokens"])
    recompute_s = (num_steps * costs["step_base_ms"] + num_tokens * costs["step_per_token_ms"]) / 1e3
    return ("copy" if copy_s <= recompute_s else "recompute"), copy_s, recompute_s


# ---- source -----------------------------------------------------------------------------------------
@dataclass
class _Attempt:
    request_id: str
    target: str
    mode: str
    reserved: bool = False
    held: bool = False  # capped at the reservation (migration.hold) until paused or resumed
    paused: bool = False
    committed: bool = False
    paused_at: float = 0.0
    stream: AdoptStream | None = None


def _describe(engine: LLMEngine, request_id: str) -> tuple[migration.RequestLoad | None, dict[str, float]]:
    load = next((load for load in migration.request_loads(engine) if load.request_id == request_id), None)
    return load, migration.cost_inputs(engine)


def _loads_and_host_room(engine: LLMEngine) -> tuple[list[migration.RequestLoad], HostRoom | None]:
    return migration.request_loads(engine), migration.host_room(engine)


class MigrationManager:
    def __init__(self, engine: EngineClient, peer: MigrationPeer, relays: RelayRegistry, config: MigrationConfig,
                 stats: MigrationStats | None = None):
        self._engine = engine
        self._peer = peer
        self._relays = relays
        self.config = config
        self.stats = stats or MigrationStats()
        self._bandwidth = config.initial_bandwidth_bytes_per_s
        self._active: dict[str, asyncio.Task] = {}
        self.last_choice: dict[str, str | float | int] = {}  # the last "auto" mode decision, for tests

    @property
    def migrating(self) -> list[str]:
        return sorted(self._active)

    def submit(self, request_id: str, target: str, mode: str = "auto") -> asyncio.Task | None:
        """Starts a migration in the background; None if the request is migrating or K are running."""
        if request_id in self._active or len(self._active) >= self.config.max_concurrent:
            return None
        task = asyncio.get_running_loop().create_task(self._run(_Attempt(request_id, target, mode)))
        self._active[request_id] = task
        task.add_done_callback(lambda _: self._active.pop(request_id, None))
        return task

    async def migrate(self, request_id: str, target: str, mode: str = "auto") -> str:
        """Runs one migration to its end: "committed" or the abort reason."""
        task = self.submit(request_id, target, mode)
        return "busy" if task is None else await task

    async def shutdown(self) -> None:
        for task in list(self._active.values()):
            task.cancel()
        await asyncio.gather(*self._active.values(), return_exceptions=True)

    async def _run(self, attempt: _Attempt) -> str:
        self.stats.num_started += 1
        try:
            await asyncio.wait_for(self._migrate(attempt), self.config.timeout_s)
        except BaseException as exc:  # noqa: BLE001 - every failure ends in a roll-back and a reason
            reason = exc.reason if isinstance(exc, MigrationAborted) else (
                "timeout" if isinstance(exc, asyncio.TimeoutError) else
                "cancelled" if isinstance(exc, asyncio.CancelledError) else "error")
            if not attempt.committed:
                await asyncio.shield(self._roll_back(attempt))
            self.stats.num_aborted[reason] += 1
            logger.info("migration of %s to %s aborted (%s): %r", attempt.request_id, attempt.target, reason, exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return reason
        self.stats.num_committed += 1
        self.stats.num_by_mode[attempt.mode] += 1
        return "committed"

    async def _call(self, awaitable):
        return await asyncio.wait_for(awaitable, self.config.call_timeout_s)

    async def _migrate(self, attempt: _Attempt) -> None:
        engine, request_id, target = self._engine, attempt.request_id, attempt.target
        load, costs = await engine.run_in_engine(_describe, request_id)
        if load is None or not load.is_migratable:
            raise MigrationAborted("not_migratable", f"{request_id} is {load.status if load else 'not here'}")
        if attempt.mode == "auto":
            attempt.mode, copy_s, recompute_s = choose_mode(load.num_tokens, costs, self._bandwidth)
            self.last_choice = {"request_id": request_id, "mode": attempt.mode, "copy_s": round(copy_s, 5),
                                "recompute_s": round(recompute_s, 5), "num_tokens": load.num_tokens}
        num_reserved = load.num_tokens + min(load.num_remaining, self.config.growth_margin_tokens)
        attempt.reserved = True  # before the call: a timed-out call may still reserve there (cancel is harmless)
        if not await self._call(self._peer.reserve(target, request_id, num_reserved)):
            attempt.reserved = False
            raise MigrationAborted("refused")
        start = None
        if attempt.mode == "copy":
            attempt.held = True  # before the call, like `paused`: a roll-back lifts it
            await engine.run_in_engine(migration.hold, request_id, num_reserved)
            start = 0
            for _ in range(self.config.max_stages):
                stage: KVStage = await engine.run_in_engine(migration.copy_kv, request_id, start)
                if stage.end > num_reserved:
                    raise MigrationAborted("outgrew_reservation")
                num_new = stage.end - start
                if start and stage.end + num_new > num_reserved:
                    # it grew num_new tokens while the last stage was sent: by the next copy it would be waiting at
                    # its hold. Pause now; the tail carries this stage's tokens.
                    break
                await self._send(attempt, stage)
                start = stage.end
                if num_new < self.config.min_stage_tokens:
                    break
        attempt.paused = True  # before the call: once queued, the pause happens even if we are cancelled
        snapshot, tail = await engine.run_in_engine(migration.pause_and_copy_tail, request_id, start,
                                                    load.num_preemptions)
        attempt.paused_at = time.monotonic()
        if snapshot.num_tokens > num_reserved:
            raise MigrationAborted("outgrew_reservation")
        if tail is not None:
            self.stats.bytes_moved += tail.num_bytes
            self.stats.num_stages += 1
        num_kv_tokens = snapshot.num_computed_tokens if attempt.mode == "copy" else 0
        attempt.stream = self._peer.adopt(target, snapshot, tail, num_kv_tokens)
        reply = await self._call(anext(attempt.stream))
        if not isinstance(reply, Committed):
            raise MigrationAborted("bad_reply", repr(reply)[:200])
        attempt.committed = True
        # Shielded: once committed, the hand-over must finish even if the watchdog fires now.
        await asyncio.shield(self._hand_over(attempt, snapshot))

    async def _hand_over(self, attempt: _Attempt, snapshot: RequestSnapshot) -> None:
        """The request lives on the destination now: give its stream to the HTTP handler, free it here."""
        request_id = attempt.request_id
        async def abandon() -> None:  # the client left: the destination stops the request
            await self._peer.cancel(attempt.target, request_id)

        self._relays.put(Relay(request_id, attempt.stream, attempt.paused_at, self.stats.record_downtime, abandon))
        try:
            await self._engine.run_in_engine(migration.release, request_id)
        except MigrationError as exc:  # the client left meanwhile (its abort freed the request here)
            await self._relays.drop(request_id)
            raise MigrationAborted("source_gone") from exc
        self._engine.end_stream(request_id, RequestOutput(request_id, (), "", finish_reason=MIGRATED,
                                                          num_prompt_tokens=len(snapshot.prompt_token_ids),
                                                          num_output_tokens=len(snapshot.output_token_ids)))

    async def _send(self, attempt: _Attempt, stage: KVStage) -> None:
        if stage.end <= stage.start:
            return
        started = time.perf_counter()
        await self._call(self._peer.write_kv(attempt.target, attempt.request_id, stage))
        seconds = max(time.perf_counter() - started, 1e-6)
        measured = stage.num_bytes / seconds
        decay = self.config.bandwidth_decay if self.stats.bandwidth_bytes_per_s else 0.0
        self._bandwidth = decay * self._bandwidth + (1 - decay) * measured
        self.stats.bandwidth_bytes_per_s = self._bandwidth
        self.stats.bytes_moved += stage.num_bytes
        self.stats.num_stages += 1

    async def _roll_back(self, attempt: _Attempt) -> None:
        """Before the commit: the destination drops what it has, the request goes on here."""
        if attempt.stream is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(attempt.stream.aclose(), self.config.call_timeout_s)
        if attempt.paused or attempt.held:
            with contextlib.suppress(MigrationError):
                await self._engine.run_in_engine(migration.resume, attempt.request_id)
        if attempt.reserved:
            try:
                await self._call(self._peer.cancel(attempt.target, attempt.request_id))
            except Exception as exc:  # noqa: BLE001 - the destination frees it when the reservation expires
                logger.warning("migration of %s: cancel on %s failed: %r", attempt.request_id, attempt.target, exc)

    # ---- what the controller plans with ---------------------------------------------------------------
    async def load_report(self, replica_id: str, stats: Callable[[], Any], started_at: float) -> ReplicaLoad:
        """The replica's `ReplicaLoad`: its requests' loads from the engine thread (between two steps), with
        `stats()` read once they arrived, so both describe the same moment."""
        loads, host = await self._engine.run_in_engine(_loads_and_host_room)
        return replica_load(replica_id, stats(), loads, started_at, set(self._active), host)
