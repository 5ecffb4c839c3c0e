"""Stream continuity across a migration: the client stays on the source replica's HTTP handler, which relays
the destination's outputs.

The source's migration registers a relay (the destination's output stream) under the request id *before*
it ends the local engine stream with finish_reason "migrated". `GenerationRun` reads that local stream
first, so it has passed on every token the source produced when it sees "migrated"; it then takes the relay
and goes on with the destination's outputs, which start at the first token the source did not produce: no
gap, no duplicate. A run that closes (client gone) drops its relays; a relay given up before its last output
*abandons* the request: it tells the destination to cancel it (`on_abandon`), then closes the stream. (A
destination whose stream closes without that cancel finishes the request anyway: the source died.)
Everything here runs on the replica's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

from engine.api import HANDED_OFF, RequestOutput

MIGRATED = HANDED_OFF  # the finish reason that ends a source stream at the hand-off
ABANDON_TIMEOUT_S = 10.0
logger = logging.getLogger("ray.serve")
_ABANDONING: set[asyncio.Task] = set()  # cancels on their way to a destination (kept from garbage collection)


class Relay:
    """The destination's outputs of one migrated request, with the downtime observed on the way."""

    def __init__(self, request_id: str, outputs: AsyncGenerator[RequestOutput, None], paused_at: float,
                 on_first_token: Callable[[float], None] | None = None,
                 on_abandon: Callable[[], Awaitable[None]] | None = None):
        self.request_id = request_id
        self._outputs = outputs
        self._paused_at = paused_at
        self._on_first_token = on_first_token
        self._on_abandon = on_abandon
        self._last_source_token_time: float | None = None
        self._has_token = False
        self._is_finished = False
        self.is_closed = False

    def start(self, last_source_token_time: float | None) -> AsyncIterator[RequestOutput]:
        self._last_source_token_time = last_source_token_time
        return self._relay()

    async def _relay(self) -> AsyncIterator[RequestOutput]:
        try:
            async for output in self._outputs:
                if not self._has_token and output.new_token_ids:
                    self._has_token = True
                    if self._on_first_token is not None:
                        # the client's gap: the source's last token to the destination's first
                        since = self._last_source_token_time or self._paused_at
                        self._on_first_token(time.monotonic() - since)
                self._is_finished = output.is_finished
                yield output
        except Exception as exc:  # the destination failed mid-stream: end the request with an error
            self._is_finished = True
            yield RequestOutput(self.request_id, (), "", finish_reason="error",
                                error=f"migrated request failed on its new replica: {exc!r}")
        finally:
            await self.close()

    async def close(self) -> None:
        """Closes the destination's stream; if the request's last output never came, nobody will read the
        rest, so the destination is first asked to cancel it (abandon). Safe to call twice."""
        self.is_closed = True
        on_abandon, self._on_abandon = self._on_abandon, None
        if on_abandon is not None and not self._is_finished:
            # In a task of its own, outside the request's context: the request being torn down is usually
            # cancelled, and Serve cancels the handle calls a cancelled request makes.
            task = asyncio.get_running_loop().create_task(self._abandon(on_abandon), context=contextvars.Context())
            _ABANDONING.add(task)
            task.add_done_callback(_ABANDONING.discard)
            with contextlib.suppress(BaseException):
                await asyncio.shield(task)
        with contextlib.suppress(Exception):
            await self._outputs.aclose()

    async def _abandon(self, on_abandon: Callable[[], Awaitable[None]]) -> None:
        try:
            await asyncio.wait_for(on_abandon(), ABANDON_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - unreachable destination: it finishes the request alone
            logger.warning("relay of %s: cancelling on the destination failed: %r", self.request_id, exc)


class RelayRegistry:
    def __init__(self):
        self._relays: dict[str, Relay] = {}
        self._live: set[Relay] = set()  # put here and not closed yet (taken or not)

    def put(self, relay: Relay) -> None:
        self._relays[relay.request_id] = relay
        self._live.add(relay)

    @property
    def num_live(self) -> int:
        """Streams this replica still relays: it must not be stopped before they end."""
        self._live = {relay for relay in self._live if not relay.is_closed}
        return len(self._live)

    def take(self, request_id: str) -> Relay | None:
        return self._relays.pop(request_id, None)

    async def drop(self, request_id: str) -> None:
        """The request's consumer is gone: cancel the destination's stream if it was never taken."""
        relay = self._relays.pop(request_id, None)
        if relay is not None:
            await relay.close()

    def __len__(self) -> int:
        return len(self._relays)
