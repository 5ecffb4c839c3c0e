"""Stream pacing: how many output chunks a second AsyncEngine hands to its asyncio consumers.

Every output a stream receives costs Python work on the serving side (a queue wake-up, an SSE chunk, a trip
through Serve's proxy), and on a small CPU that work takes cores from the engine's GEMMs: at 32 streaming
requests one chunk per request per step made a decode step ~35% slower than the same step unstreamed. A
`PacedStream` bounds that work to about `chunks_per_s` chunks a second over all open streams.

The contract (`PacedStream.put` runs on the stream's event loop; the engine thread only schedules it there
with `call_soon_threadsafe`, so pacing never blocks a step):
- A stream's first output is delivered at once: time to first token is never held.
- Each later output is delivered no earlier than `pace_interval(N, chunks_per_s)` = min(N / chunks_per_s,
  MAX_INTERVAL_S) seconds after the stream's previous delivery, N being the streams open when it arrives. One
  that arrives sooner is merged (`merge_outputs`: tokens, text delta, logprobs) into the stream's pending
  output, which a timer (`loop.call_later`) delivers when the interval ends.
- A finishing output is never held: it is delivered at once with anything pending merged into it.
- What must stay apart (`stands_apart`: an exception, a hand-off to another replica, a failed or aborted
  request, whose consumers read no tokens from it) is delivered at once, after the pending output.
- `chunks_per_s` None: every output is delivered as it comes. `close()` (the consumer left) drops the timer.
Merging changes only how tokens are grouped into chunks, never which tokens, text or logprobs arrive.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from engine.api import HANDED_OFF, RequestOutput

MAX_INTERVAL_S = 0.25  # no stream waits longer than this between two chunks, however many are open
APART = (HANDED_OFF, "error", "abort")  # finish reasons whose output is delivered on its own, never merged


def merge_outputs(first: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of the same request (tokens, text and logprobs joined;
    counts and finish from the later; the first token's queue and prefill times from whichever has them)."""
    timed = first if first.queue_time_s is not None else later
    return replace(later, new_token_ids=first.new_token_ids + later.new_token_ids,
                   text_delta=first.text_delta + later.text_delta, logprobs=first.logprobs + later.logprobs,
                   queue_time_s=timed.queue_time_s, prefill_time_s=timed.prefill_time_s)


def stands_apart(item: RequestOutput | BaseException) -> bool:
    """An error, or an ending whose consumer reads no tokens from it: never merged with the tokens before it."""
    return isinstance(item, BaseException) or item.finish_reason in APART


def pace_interval(num_streams: int, chunks_per_s: float) -> float:
    """The least time between two deliveries to one stream while `num_streams` are open."""
    return min(max(num_streams, 1) / chunks_per_s, MAX_INTERVAL_S)


class PacedStream:
    """One request's stream: `put` (on `loop`) delivers outputs into `queue` at the pace above."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, chunks_per_s: float | None,
                 open_streams):
        """`open_streams()`: how many streams are open now (N)."""
        self.loop = loop
        self.queue = queue
        self._chunks_per_s = chunks_per_s
        self._open_streams = open_streams
        self._pending: RequestOutput | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last: float | None = None  # loop time of the last delivery; None: nothing delivered yet
        self._closed = False
        self.has_ended = False  # its last output (or an error) was put: the request no longer runs for it

    def put(self, item: RequestOutput | BaseException) -> None:
        if self._closed:
            return
        self.has_ended = self.has_ended or isinstance(item, BaseException) or item.is_finished
        if self._chunks_per_s is None:
            self.queue.put_nowait(item)
            return
        if self._last is None or stands_apart(item) or item.is_finished:
            self._flush(item)
            return
        self._pending = item if self._pending is None else merge_outputs(self._pending, item)
        if self._timer is None:
            delay = self._last + pace_interval(self._open_streams(), self._chunks_per_s) - self.loop.time()
            if delay <= 0:
                self._release()
            else:
                self._timer = self.loop.call_later(delay, self._release)

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        """The interval ended: the pending output goes out."""
        self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None and not self._closed:
            self._send(pending)

    def _flush(self, item: RequestOutput | BaseException) -> None:
        """Delivers `item` now, the pending output merged into it or, if it stands apart, before it."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            if stands_apart(item):
                self._send(pending)
            else:
                item = merge_outputs(pending, item)
        self._send(item)

    def _send(self, item: RequestOutput | BaseException) -> None:
        self._last = self.loop.time()
        self.queue.put_nowait(item)
