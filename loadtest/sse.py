"""Incremental Server-Sent Events parser: bytes in arbitrary splits -> events.

Follows the WHATWG event-stream rules that OpenAI-compatible servers rely on: lines end in LF, CRLF or
CR; a blank line dispatches the event; `:` starts a comment; `data` lines of one event are joined with
"\n"; one leading space after the colon is dropped. A network read can end anywhere, including in the
middle of a UTF-8 character or between the CR and LF of one line break, so both are carried over.
Pure Python and free of I/O, so the Locust user and the tests drive it the same way.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

DONE_SENTINEL = "[DONE]"


@dataclass(frozen=True)
class SseEvent:
    data: str
    event: str = "message"  # the `event:` field; "message" when the server sent none
    id: str | None = None  # the last `id:` seen on the stream (it persists across events, per the spec)
    retry_ms: int | None = None

    @property
    def is_done(self) -> bool:
        """OpenAI's end-of-stream marker, `data: [DONE]`."""
        return self.data.strip() == DONE_SENTINEL

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def error(self) -> dict | None:
        """The error an OpenAI-style server streams mid-response, or None.

        vLLM and our server send `data: {"error": {...}}` after the 200 status is already out; some servers
        use `event: error` instead. Either way the request failed even though HTTP said 200.
        """
        if self.is_done:
            return None
        try:
            payload = json.loads(self.data)
        except ValueError:
            payload = None
        if isinstance(payload, dict) and "error" in payload:
            error = payload["error"]
            return error if isinstance(error, dict) else {"message": str(error)}
        if self.event == "error":
            return payload if isinstance(payload, dict) else {"message": self.data}
        return None


class SseParser:
    """Feed bytes as they arrive; get back the events they complete."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # text after the last complete line
        self._skip_leading_lf = False  # the previous chunk ended in CR: an LF starting this one is the same break
        self._is_first_line = True
        self._data_lines: list[str] = []
        self._event_type = ""
        self._last_id: str | None = None
        self._retry_ms: int | None = None

    def feed(self, chunk: bytes | str) -> list[SseEvent]:
        text = chunk if isinstance(chunk, str) else self._decoder.decode(chunk)
        return self._consume(text)

    def close(self) -> list[SseEvent]:
        """End of stream. Dispatches an event the server left unterminated (no blank line after it).

        The spec says to drop such an event, but a server that ends with `data: [DONE]\\n` and closes is common
        enough, and losing its last event would turn a good request into an error.
        """
        events = self._consume(self._decoder.decode(b"", final=True))
        if self._pending:
            self._process_line(self._pending, events)
            self._pending = ""
        self._dispatch(events)
        return events

    def _consume(self, text: str) -> list[SseEvent]:
        events: list[SseEvent] = []
        if self._skip_leading_lf and text:
            if text[0] == "\n":
                text = text[1:]
            self._skip_leading_lf = False
        buffer = self._pending + text
        start = 0
        length = len(buffer)
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                line_end, next_start = lf, lf + 1
            elif cr + 1 < length:
                line_end = cr
                next_start = cr + 2 if buffer[cr + 1] == "\n" else cr + 1
            else:  # CR is the last character: its LF, if any, is in the next chunk
                line_end, next_start = cr, cr + 1
                self._skip_leading_lf = True
            self._process_line(buffer[start:line_end], events)
            start = next_start
        self._pending = buffer[start:]
        return events

    def _process_line(self, line: str, events: list[SseEvent]) -> None:
        if self._is_first_line:
            self._is_first_line = False
            line = line.removeprefix("\ufeff")
        if line == "":
            self._dispatch(events)
            return
        if line.startswith(":"):
            return  # comment; servers send these as keep-alives
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data_lines.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        elif name == "retry":
            if value.isdigit():
                self._retry_ms = int(value)
        # other field names are ignored, as the spec requires

    def _dispatch(self, events: list[SseEvent]) -> None:
        if self._data_lines:
            events.append(
                SseEvent(
                    data="\n".join(self._data_lines),
                    event=self._event_type or "message",
                    id=self._last_id,
                    retry_ms=self._retry_ms,
                )
            )
        self._data_lines = []
        self._event_type = ""
