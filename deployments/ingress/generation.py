"""Running the engine requests behind one HTTP request (one per choice) and cleaning up after them.

`GenerationRun.start()` pulls the first output of every choice, so that validation and overload errors
(which the engine raises at the first `__anext__`) become an HTTP status before any byte is sent.
`outputs()` then merges the choices' streams. `close()` aborts whatever has not finished; it runs in the
caller's `finally`, which is where a client disconnect arrives (as `asyncio.CancelledError`). A choice
whose engine stream ends with finish_reason "migrated" goes on with the destination replica's outputs from
the relay registry (deployments/migration/relay.py); the client sees one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from deployments.ingress.metrics import RequestTimer, ServingMetrics
from deployments.migration.relay import MIGRATED, Relay, RelayRegistry
from engine.api import EngineClient, GenerateRequest, RequestOutput

logger = logging.getLogger(__name__)


@dataclass
class _Choice:
    index: int
    request: GenerateRequest
    stream: AsyncIterator[RequestOutput]
    timer: RequestTimer
    first_output: RequestOutput | None = None
    pending: asyncio.Future | None = None
    num_prompt_tokens: int = 0
    is_finished: bool = False
    relay: Relay | None = None  # set once the request migrated to another replica


class GenerationRun:
    def __init__(self, engine: EngineClient, requests: list[GenerateRequest], metrics: ServingMetrics,
                 relays: RelayRegistry | None = None, model_name: str | None = None):
        """`model_name`: the served name its metrics carry (None: the app's default model)."""
        self._engine = engine
        self._metrics = metrics
        self._relays = relays
        self._choices = [
            _Choice(index, request, engine.generate(request), RequestTimer(metrics, request.arrival_time, model_name))
            for index, request in enumerate(requests)
        ]
        self._is_closed = False
        self._is_aborted = False
        self._close_callbacks: list = []

    def on_close(self, callback) -> None:
        """`callback(run)` runs once when the run closes."""
        self._close_callbacks.append(callback)

    async def abort(self) -> None:
        """Asks the engine to end every unfinished choice: each stream then ends with finish_reason
        "abort", which the HTTP layer reports to the client (the server-side end of a request). A choice
        whose request has not reached the engine yet is aborted as soon as its first output arrives."""
        self._is_aborted = True
        for choice in self._choices:
            if not choice.is_finished:
                await self._abort_choice(choice)

    async def _abort_choice(self, choice: _Choice) -> None:
        try:
            await self._engine.abort(choice.request.request_id)
        except Exception:
            logger.warning("abort of %s failed", choice.request.request_id, exc_info=True)

    async def start(self) -> None:
        """Waits for every choice's first output and raises the first error; the caller then closes the run,
        which aborts the choices that did start."""
        firsts = await asyncio.gather(*(self._first(choice) for choice in self._choices),
                                      return_exceptions=True)
        for result in firsts:
            if isinstance(result, BaseException):
                raise result

    async def _first(self, choice: _Choice) -> None:
        try:
            choice.first_output = await anext(choice.stream)
        except Exception:
            # Rejected before it started (validation, overload): nothing to abort or to count as finished.
            choice.is_finished = True
            choice.timer.is_finished = True
            raise
        self._observe(choice, choice.first_output)
        if self._is_aborted and not choice.is_finished:  # aborted before the engine had the request
            await self._abort_choice(choice)

    async def outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, output) pairs in arrival order; each choice ends with a finished output."""
        for choice in self._choices:
            yield choice.index, choice.first_output
        if len(self._choices) == 1:
            choice = self._choices[0]
            while not choice.is_finished:
                output = await self._next_or_end(choice)
                self._observe(choice, output)
                yield choice.index, output
            return
        running = {}
        for choice in self._choices:
            if not choice.is_finished:
                choice.pending = asyncio.ensure_future(self._next_or_end(choice))
                running[choice.pending] = choice
        while running:
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                choice = running.pop(future)
                choice.pending = None
                output = future.result()
                self._observe(choice, output)
                yield choice.index, output
                if not choice.is_finished:
                    choice.pending = asyncio.ensure_future(self._next_or_end(choice))
                    running[choice.pending] = choice

    async def _next_or_end(self, choice: _Choice) -> RequestOutput:
        while True:
            try:
                output = await anext(choice.stream)
            except StopAsyncIteration:
                # The contract ends every stream with a finished output; treat a bare end as an abort.
                return RequestOutput(choice.request.request_id, (), "", finish_reason="abort",
                                     num_prompt_tokens=choice.num_prompt_tokens)
            if output.finish_reason != MIGRATED:
                return output
            relay = self._relays.take(choice.request.request_id) if self._relays is not None else None
            if relay is None:
                return RequestOutput(choice.request.request_id, (), "", finish_reason="error",
                                     error="the request moved to another replica and its relay is missing",
                                     num_prompt_tokens=choice.num_prompt_tokens)
            with contextlib.suppress(Exception):
                await choice.stream.aclose()
            choice.relay = relay
            choice.stream = relay.start(choice.timer.last_token_time)

    def _observe(self, choice: _Choice, output: RequestOutput) -> None:
        now = time.monotonic()
        choice.num_prompt_tokens = output.num_prompt_tokens or choice.num_prompt_tokens
        choice.timer.on_tokens(len(output.new_token_ids), now)
        if output.queue_time_s is not None:
            choice.timer.on_first_token_times(output.queue_time_s, output.prefill_time_s)
        if output.is_finished:
            choice.is_finished = True
            choice.timer.on_finished(output.finish_reason, output.num_prompt_tokens, now)

    async def close(self) -> None:
        """Aborts every unfinished choice. Safe to call twice and from a cancelled task."""
        if self._is_closed:
            return
        self._is_closed = True
        for callback in self._close_callbacks:
            callback(self)
        for choice in self._choices:
            if choice.pending is not None and not choice.pending.done():
                choice.pending.cancel()
                with contextlib.suppress(BaseException):
                    await choice.pending
            if not choice.is_finished:
                choice.is_finished = True
                now = time.monotonic()
                choice.timer.on_finished("abort", choice.num_prompt_tokens or
                                         len(choice.request.prompt_token_ids), now)
                try:
                    await self._engine.abort(choice.request.request_id)
                except Exception:
                    logger.warning("abort of %s failed", choice.request.request_id, exc_info=True)
            with contextlib.suppress(Exception):
                await choice.stream.aclose()
            if choice.relay is not None:
                await choice.relay.close()
            if self._relays is not None:
                await self._relays.drop(choice.request.request_id)
