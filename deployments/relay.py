"""Stream continuity across a migration: the client stays on the source replica's HTTP handler, which relays
the destination's outputs.

The source's migration registers a relay (the destination's output stream) under the request id *before*
it ends the local engine stream with finish_reason "migrated". `GenerationRun` reads that local stream
first, so it has passed on every token the source produced when it sees "migrated"; it then takes the relay
and goes on with the destination's outputs, which start at the first token the source did not produce: no
gap, no duplicate. A run that closes (client gone) drops its relays, which cancels the destination's
request. Everything here runs on the replica's event loop.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

from engine.api import RequestOutput

MIGRATED = "migrated"


class Relay:
    """The destination's outputs of one migrated request, with the downtime observed on the way."""

    def __init__(self, request_id: str, outputs: AsyncIterator[RequestOutput], paused_at: float,
                 on_first_token: Callable[[float], None] | None = None):
        self.request_id = request_id
        self._outputs = outputs
        self._paused_at = paused_at
        self._on_first_token = on_first_token
        self._last_source_token_time: float | None = None
        self._has_token = False

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
                yield output
        except Exception as exc:  # the destination failed mid-stream: end the request with an error
            yield RequestOutput(self.request_id, (), "", finish_reason="error",
                                error=f"migrated request failed on its new replica: {exc!r}")
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        close = getattr(self._outputs, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


class RelayRegistry:
    def __init__(self):
        self._relays: dict[str, Relay] = {}

    def put(self, relay: Relay) -> None:
        self._relays[relay.request_id] = relay

    def take(self, request_id: str) -> Relay | None:
        return self._relays.pop(request_id, None)

    async def drop(self, request_id: str) -> None:
        """The request's consumer is gone: cancel the destination's stream if it was never taken."""
        relay = self._relays.pop(request_id, None)
        if relay is not None:
            await relay.aclose()

    def __len__(self) -> int:
        return len(self._relays)
