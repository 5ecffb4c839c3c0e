"""AsyncEngine: runs LLMEngine's step loop on a background thread and streams each request's outputs
to asyncio consumers.

The engine thread owns the engine: every add and abort reaches it through an inbox drained between
steps, so no engine state is touched from two threads. Outputs go back to each request's asyncio
queue with `call_soon_threadsafe`, paced there (engine/stream_pacer.py, `config.stream_chunks_per_s`): with
many streams open, the outputs a stream receives between two deliveries are merged into one chunk. A
failing step fails only the requests in it; the loop goes on. The loop thread is the process's one OpenMP
master: the thread that built the engine releases its pool when it hands the engine over here
(engine/openmp_pools.py: with a second pool a 128-token prefill took ~60% longer).
`check_health()` fails when the loop died, or when one pass of it (inbox + step) has been running for
more than `config.stall_timeout_s` (a hung kernel or collective): a long request is many short steps.

KunServe across replicas: `cooperate(driver, form)` forms a cooperative pair on the engine thread and then
lets the pair's side drive the loop (engine/cooperative/remote.py's `RemoteLeader`, follower.py's
`RemoteFollower`: each `tick()` is one step or one message of the pair) until the pair dissolves; while
this replica follows, its clients' requests go to the leader through the follower and their outputs come
back from it to the same streams.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TypeVar

from engine.api import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    GenerateRequest,
    InvalidRequestError,
    RequestOutput,
)
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.kv_audit import KVAudit, describe_call
from engine.model_view import ModelView
from engine.openmp_pools import release_openmp_pool
from engine.stream_pacer import PacedStream, merge_outputs, stands_apart

if TYPE_CHECKING:
    from engine.core.engine_group import EngineGroup
    from engine.parallel.executor import TensorParallelExecutor

logger = logging.getLogger(__name__)
T = TypeVar("T")


def set_thread_nice(nice: int | None) -> bool:
    """Sets the calling thread's nice value (Linux: per thread; threads it starts later inherit it). False,
    with a warning, when the OS refuses (a lower value needs CAP_SYS_NICE); None: nothing to do."""
    if nice is None or not hasattr(os, "setpriority"):
        return nice is None
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread, nice)
    except OSError as error:
        logger.warning("engine loop stays at nice %d (nice %d refused: %s); under Ray, start it with "
                       "RAY_worker_niceness=0 so workers are not at 15", os.getpriority(os.PRIO_PROCESS, thread),
                       nice, error.strerror)
        return False
    return True


def _settle(future: asyncio.Future, result, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _coalesce(output: RequestOutput,
              stream: asyncio.Queue) -> tuple[RequestOutput, RequestOutput | BaseException | None]:
    """`output` merged with the outputs already waiting behind it. When the consumer (SSE encoding, Serve's
    streaming) falls behind the engine, it then handles one chunk per request per catch-up instead of one per
    token, so per-chunk Python work stops growing with the lag and taking CPU from the engine. Nothing waits
    for more: a consumer that keeps up still gets every step's tokens at once. What must stay apart is
    returned to come after the merged output: an error queued behind it (an exception, a failed or aborted
    request), and a hand-off ("migrated": the consumer switches to the destination's stream there and reads
    no tokens from that output). engine/stream_pacer.py paces what reaches the queue in the first place."""
    while not output.is_finished:
        try:
            later = stream.get_nowait()
        except asyncio.QueueEmpty:
            break
        if stands_apart(later):
            return output, later
        output = merge_outputs(output, later)
    return output, None


class AsyncEngine:
    """An `engine.api.EngineClient` around one LLMEngine (with its tensor-parallel executor, if any), or
    around an EngineGroup (several models of one pool, stepped by this one thread; `for_model(name)` gives
    each model's client, engine/model_view.py)."""

    supports_migration = True  # engine/migration.py works on LLMEngine (an EngineGroup declares False)

    def __init__(self, engine: LLMEngine | EngineGroup):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.model_name = engine.model_name
        self.model_names: tuple[str, ...] = engine.model_names
        self.supports_migration = engine.supports_migration
        self._views: dict[str, ModelView] = {}
        self.config = engine.config
        self._inbox: queue.Queue = queue.Queue()
        self._wake = threading.Event()
        self._streams: dict[str, PacedStream] = {}  # request id -> its stream (queue, loop, pacing)
        self._peak_tokens: dict[str, int] = {}  # request id -> tokens it holds at its last possible token
        self._arrival_listeners: list[Callable[[], None]] = []
        self._stop = False
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stats = engine.stats()
        self._telemetry = [engine.pool.telemetry().to_dict()]
        self._telemetry_time = 0.0
        self._busy_since: float | None = None  # when the current loop pass started working; None: idle
        self._driver = None  # KunServe: this replica's side of a cooperative pair while it is formed
        kv = getattr(engine, "kv", None)  # an EngineGroup's models each have their own
        self._audit = KVAudit(kv) if engine.config.check_kv_invariants and kv is not None else None
        # the engine was built on this thread (packing weights in parallel regions); from now on the loop thread
        # computes, and its OpenMP pool must be the process's only one (engine/openmp_pools.py)
        release_openmp_pool()

    @classmethod
    def from_config(cls, config: EngineConfig, executor: TensorParallelExecutor | None = None) -> AsyncEngine:
        return cls(LLMEngine(config, executor=executor))

    def for_model(self, name: str) -> EngineClient:
        """The client of one served model (this engine itself when it serves one); KeyError if not served."""
        if name not in self.model_names:
            raise KeyError(f"model {name!r} is not served here (models: {list(self.model_names)})")
        if len(self.model_names) == 1:
            return self
        if name not in self._views:
            self._views[name] = ModelView(self, self.engine.engines[name])
        return self._views[name]

    # ---- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.start_thread()

    def start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        self.stop_thread()

    def stop_thread(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.engine.close()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._error is None

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self._error!r})")
        self.engine.validate(request)  # uses only immutable engine facts: safe off the engine thread
        if len(self._streams) >= self.engine.max_in_flight:
            raise EngineOverloadedError(f"{len(self._streams)} requests in flight; try again shortly")
        stream = self._open_stream(request.request_id)
        self._peak_tokens[request.request_id] = min(self.max_model_len,
                                                    len(request.prompt_token_ids) + request.sampling.max_tokens)
        for listener in self._arrival_listeners:
            try:
                listener()
            except Exception:  # telemetry's business: never the request's
                logger.exception("an arrival listener failed")

        async def submit() -> None:
            self._inbox.put(("add", request))
            self._wake.set()

        try:
            async for output in self._stream(request.request_id, stream, submit):
                yield output
        finally:
            self._peak_tokens.pop(request.request_id, None)

    def peak_tokens(self) -> list[int]:
        """The tokens each request of this replica's clients (`generate`) holds at its last possible token
        (max_tokens or the context limit), from the moment it arrived: a spike's KV demand seen before the
        engine thread takes it in (KunServe's drop plan; deployments/cluster/cooperation.py)."""
        return list(self._peak_tokens.values())

    def add_arrival_listener(self, listener: Callable[[], None]) -> None:
        """Calls `listener()` on the caller's event loop each time a request arrives (after `peak_tokens` counts
        it): a replica reports a spike's demand at once rather than at its next telemetry period. A listener that
        raises is logged, never the request's failure."""
        self._arrival_listeners.append(listener)

    async def run_in_engine(self, function: Callable[..., T], *args: object) -> T:
        """Runs `function(engine, *args)` on the engine thread between two steps; returns its result.
        (Migration uses this: nothing touches engine state from another thread.)"""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._inbox.put(("call", (function, args, loop, future)))
        self._wake.set()
        return await future

    async def stream_attached(self, request_id: str, attach: Callable[..., object],
                              *args: object) -> AsyncIterator[RequestOutput]:
        """Subscribes to a request's outputs, then runs `attach(engine, *args)` (which must put that
        request into the engine, e.g. migration.attach), so no output can be missed."""
        stream = self._open_stream(request_id)
        async for output in self._stream(request_id, stream, lambda: self.run_in_engine(attach, *args)):
            yield output

    async def cooperate(self, driver, form: Callable[[], T]) -> T:
        """Runs `form()` (forming a cooperative pair) on the engine thread, then `driver` runs the loop."""

        def install(engine: LLMEngine) -> T:
            result = form()
            self._driver = driver
            self._refresh_observations()
            return result

        return await self.run_in_engine(install)

    @property
    def driver(self):
        return self._driver

    def _open_stream(self, request_id: str) -> asyncio.Queue:
        # registering it would take over a running stream; one that has ended (e.g. handed off to another replica,
        # whose consumer went on with the relay and has not left its generator yet) is replaced: the request may
        # come back here (migrated away and back) before that consumer lets go
        current = self._streams.get(request_id)
        if current is not None and not current.has_ended:
            raise InvalidRequestError(f"request id {request_id!r} is already running here", param="request_id")
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = PacedStream(asyncio.get_running_loop(), stream, self.config.stream_chunks_per_s,
                                                self._streams.__len__)
        return stream

    async def _stream(self, request_id: str, stream: asyncio.Queue, start) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until the last one; leaving early (or failing) aborts it."""
        finished = False
        try:
            await start()
            while not finished:
                output = await stream.get()
                if isinstance(output, BaseException):
                    raise output
                output, after = _coalesce(output, stream)
                finished = output.is_finished
                yield output
                if isinstance(after, BaseException):
                    raise after
                if after is not None:
                    finished = after.is_finished
                    yield after
        finally:
            paced = self._streams.get(request_id)
            still_registered = paced is not None and paced.queue is stream  # not replaced after it ended
            if still_registered:
                del self._streams[request_id]
                paced.close()
            if not finished and still_registered:  # a replaced stream had ended: the id's run now is another's
                self._inbox.put(("abort", request_id))
                self._wake.set()

    def end_stream(self, request_id: str, output: RequestOutput) -> None:
        """Delivers a last output to a local stream from the engine thread (e.g. 'migrated')."""
        self._deliver(request_id, output)

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def max_tokens_that_fit(self, num_prompt_tokens: int) -> int:
        """The largest max_tokens a request with this prompt can ask for (context and KV memory)."""
        return self.engine.max_tokens_that_fit(num_prompt_tokens)  # pure: reads immutable sizes only

    async def check_health(self) -> None:
        if not self.is_running:
            raise EngineDeadError(f"the engine loop is not running ({self._error!r})")
        busy_since = self._busy_since
        if busy_since is not None:
            busy_s = time.monotonic() - busy_since
            if busy_s > self.config.stall_timeout_s:
                raise EngineDeadError(f"the engine loop has not advanced for {busy_s:.1f} s "
                                      f"(stall_timeout_s={self.config.stall_timeout_s})")

    def stats(self) -> EngineStats:
        return self._stats

    def memory_telemetry(self) -> list[dict]:
        return self._telemetry

    # ---- the engine thread -----------------------------------------------------------------------
    def _deliver(self, request_id: str, item) -> None:
        paced = self._streams.get(request_id)
        if paced is not None:  # paced on the stream's loop (engine/stream_pacer.py): never waits here
            paced.loop.call_soon_threadsafe(paced.put, item)

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "call":
                function, args, loop, future = payload
                try:
                    result = function(self.engine, *args)
                except Exception as error:  # noqa: BLE001 - handed to the awaiting coroutine
                    loop.call_soon_threadsafe(_settle, future, None, error)
                else:
                    loop.call_soon_threadsafe(_settle, future, result, None)
                if self._audit is not None:
                    self._audit.after(describe_call(function, args))
                continue
            target = self._driver if self._driver is not None and hasattr(self._driver, "submit") else None
            if kind == "add":
                try:
                    if target is not None:  # following a pair: the leader runs it
                        target.submit(payload)
                    else:
                        self.engine.add_request(payload)
                except Exception as error:  # noqa: BLE001 - reported to that request only
                    self._deliver(payload.request_id, error)
            else:
                output = target.abort(payload) if target is not None else self.engine.abort(payload)
                if output is not None:
                    self._deliver(payload, output)

    def _run(self) -> None:
        set_thread_nice(self.config.engine_thread_nice)
        try:
            while not self._stop:
                self._busy_since = time.monotonic()
                self._drain_inbox()
                if self._driver is not None:
                    self._tick()
                    continue
                if not self.engine.has_work:
                    self._refresh_observations()
                    self._busy_since = None
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                num_steps = self.engine.num_steps
                try:
                    outputs = self.engine.step()
                except Exception as error:  # noqa: BLE001 - a bad step fails its requests, not the loop
                    logger.exception("engine step failed")
                    outputs = self.engine.fail_running(error)
                if self.engine.num_steps == num_steps:  # (LLMEngine and EngineGroup count the steps that ran)
                    # nothing could run (a request held for its migration, decodes deferred for their fetches)
                    self._wake.wait(timeout=0.002)  # do not spin
                    self._wake.clear()
                for output in outputs:
                    self._deliver(output.request_id, output)
                if self._audit is not None:
                    self._audit.after("step: " + " ".join(f"{o.request_id}{'.' if o.is_finished else ''}"
                                                          for o in outputs))
                self._refresh_observations()
        except BaseException as error:  # the loop itself broke: every waiting stream must hear it
            self._error = error
            logger.exception("engine loop died")
            for request_id in list(self._streams):
                self._deliver(request_id, EngineDeadError(str(error)))

    def _tick(self) -> None:
        """One step or message of the cooperative pair; the engine's own loop again once it dissolved."""
        driver = self._driver
        try:
            outputs = driver.tick()
        except Exception as error:  # noqa: BLE001 - as a failed step: its requests fail, the loop goes on
            logger.exception("cooperative pair step failed")
            try:
                outputs = self.engine.fail_running(error)
            except Exception:  # noqa: BLE001 - a step that failed inside the scheduler left it inconsistent
                logger.exception("could not end the failed step's requests")
                outputs = []
        for output in outputs:
            self._deliver(output.request_id, output)
        if not driver.is_formed:
            self._driver = None
        self._refresh_observations()
        if driver.is_idle():
            self._busy_since = None
            self._wake.wait(timeout=0.005)  # a leader with no work still exchanges with its follower
            self._wake.clear()

    def _refresh_observations(self) -> None:
        self._stats = self.engine.stats()
        now = time.monotonic()
        # gathering from tensor-parallel ranks is a collective: at most every 0.25 s
        if self.engine.executor is None or now - self._telemetry_time >= 0.25:
            self._telemetry = self.engine.memory_telemetry()
            self._telemetry_time = now
