"""What the engine promises the layers above it (deployments/, loadtest/offline).

The HTTP layer only ever sees these types: a request goes in as `GenerateRequest`, comes back as a
stream of `RequestOutput`, and failures are the typed errors below (each maps to one HTTP status).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.sampling_params import SamplingParams


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (HTTP 400). `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineOverloadedError(EngineError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class EngineDeadError(EngineError):
    """The engine loop stopped; no request can be served (HTTP 500)."""


class LayersDroppedError(EngineError):
    """A step needs layers whose weights this replica dropped (KunServe): it can only run them as one
    stage of a cooperative pipeline, or after restoring them."""


@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float = 0.0  # time.monotonic() when the HTTP layer received it
    priority: int = 0  # lower is more urgent (vLLM's `priority`); scales the SLO targets (engine/core/slo.py)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the top-n alternatives


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's stream. The last one has `finish_reason` set."""

    request_id: str
    new_token_ids: tuple[int, ...]
    text_delta: str
    finish_reason: str | None = None  # None while running; "stop" | "length" | "abort" | "error"
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # total so far
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    logprobs: tuple[TokenLogprob, ...] = field(default_factory=tuple)
    error: str | None = None  # set when finish_reason == "error"

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    """A cheap snapshot for routing, metrics and the controller."""

    num_running: int
    num_waiting: int
    num_swapped: int
    num_preemptions: int  # cumulative
    kv_chunks_used: int
    kv_chunks_free: int  # free in the pool, including what other balloons could give back
    kv_usage: float  # used / (used + free) in [0, 1]
    num_prefix_cache_hits: int  # cumulative tokens
    num_prefix_cache_queries: int  # cumulative tokens
    kv_chunks_cached: int = 0  # held by the kv balloon for the prefix cache only (reclaimable)
    kv_offloaded_layers: int = 0  # (request, layer) pairs with pages on the host (layer-wise offloading)
    kv_host_bytes: int = 0  # host-buffer bytes those pages take
    kv_bytes_fetched: int = 0  # cumulative bytes staged from the host for offloaded layers
    kv_bytes_fetched_last_step: int = 0
    slo_attained: int = 0  # finished requests that met their class's TTFT and TPOT targets
    slo_finished: int = 0
    # KunServe parameter dropping: normal | dropping | dropped | restoring; the weights given back to the
    # pool; the share of idle stage time while this replica serves in a cooperative pipeline
    drop_state: str = "normal"
    dropped_weight_bytes: int = 0
    pipeline_bubble_ratio: float = 0.0
