"""The OpenAI streaming protocol as the load test speaks it: request bodies out, a timed record back.

Pure Python (no HTTP, no Locust) so the arithmetic of one stream is unit-tested with made-up timings;
the Locust user only moves bytes and clocks into `StreamTimer`.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadtest.metrics import RequestRecord
from loadtest.sse import SseParser

ENDPOINT_PATHS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass(frozen=True)
class RequestOptions:
    """What every request carries besides its prompt."""

    model: str
    # vLLM-style extras that force the output length the workload asks for. A server that rejects unknown
    # fields (the real OpenAI API does) needs them off; then output lengths are whatever the model says.
    is_forcing_output_length: bool = True
    temperature: float = 0.0  # greedy: runs are repeatable and comparable across servers

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model must be set (GET /v1/models names it)")


def request_body(endpoint: str, prompt: str, messages: list[dict], max_tokens: int, options: RequestOptions) -> dict:
    if endpoint not in ENDPOINT_PATHS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINT_PATHS)}")
    body: dict = {
        "model": options.model,
        "max_tokens": max_tokens,
        "temperature": options.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if endpoint == "chat":
        body["messages"] = messages
    else:
        body["prompt"] = prompt
    if options.is_forcing_output_length:
        body["ignore_eos"] = True
        body["min_tokens"] = max_tokens
    return body


def chunk_text(chunk: dict) -> str:
    """Generated text in one streamed chunk, for either endpoint ("" for role-only and usage-only chunks)."""
    pieces = []
    for choice in chunk.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if text is None:
            text = (choice.get("delta") or {}).get("content")
        if text:
            pieces.append(text)
    return "".join(pieces)


class StreamTimer:
    """Reads one streamed response, chunk by chunk, and times its tokens.

    A token arrival is a chunk that carries generated text: the role-only first chunk of chat and the final
    usage-only chunk are not tokens, so they do not start the TTFT clock.
    """

    def __init__(
        self,
        request_id: str,
        endpoint: str,
        start_time: float,
        num_requested_output_tokens: int,
        pool: str = "main",
        session_id: str = "",
        turn: int = 0,
    ) -> None:
        self.request_id = request_id
        self.endpoint = endpoint
        self.start_time = start_time
        self.num_requested_output_tokens = num_requested_output_tokens
        self.pool = pool
        self.session_id = session_id
        self.turn = turn
        self._parser = SseParser()
        self.token_times_s: list[float] = []
        self.text_parts: list[str] = []
        self.num_prompt_tokens: int | None = None
        self.num_completion_tokens: int | None = None
        self.error: str | None = None
        self.is_done = False

    def feed(self, data: bytes | str, elapsed_s: float) -> list[float]:
        """Bytes that arrived `elapsed_s` after the request was sent. Returns the new token arrival times."""
        return self._handle(self._parser.feed(data), elapsed_s)

    def _handle(self, events, elapsed_s: float) -> list[float]:
        arrivals = []
        for event in events:
            if self.is_done or self.error is not None:
                continue
            if event.is_done:
                self.is_done = True
                continue
            error = event.error
            if error is not None:
                self.error = f"stream error: {error.get('message', error)}"
                continue
            try:
                chunk = event.json()
            except ValueError:
                self.error = f"malformed chunk: {event.data[:100]!r}"
                continue
            if not isinstance(chunk, dict):
                continue
            text = chunk_text(chunk)
            if text:
                self.token_times_s.append(elapsed_s)
                self.text_parts.append(text)
                arrivals.append(elapsed_s)
            usage = chunk.get("usage")
            if isinstance(usage, dict):
                self.num_prompt_tokens = usage.get("prompt_tokens", self.num_prompt_tokens)
                self.num_completion_tokens = usage.get("completion_tokens", self.num_completion_tokens)
        return arrivals

    @property
    def text(self) -> str:
        return "".join(self.text_parts)

    def finish(self, elapsed_s: float, error: str | None = None, status_code: int | None = 200) -> RequestRecord:
        """The stream ended (or failed with `error`) `elapsed_s` after the request was sent."""
        self._handle(self._parser.close(), elapsed_s)
        error = error or self.error
        if error is None and not self.is_done:
            error = "stream ended without data: [DONE]"
        is_usage_reported = self.num_completion_tokens is not None
        return RequestRecord(
            request_id=self.request_id,
            endpoint=self.endpoint,
            start_time=self.start_time,
            e2e_s=elapsed_s,
            ttft_s=self.token_times_s[0] if self.token_times_s else None,
            token_times_s=tuple(self.token_times_s),
            num_prompt_tokens=self.num_prompt_tokens,
            num_output_tokens=self.num_completion_tokens if is_usage_reported else len(self.token_times_s),
            num_requested_output_tokens=self.num_requested_output_tokens,
            is_usage_reported=is_usage_reported,
            error=error,
            status_code=status_code,
            pool=self.pool,
            session_id=self.session_id,
            turn=self.turn,
        )
