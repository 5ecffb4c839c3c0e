"""What the engine promises the layers above it (deployments/, loadtest/offline).

The HTTP layer only ever sees these types: a request goes in as `GenerateRequest`, comes back as a
stream of `RequestOutput`, and failures are typed errors (each maps to one HTTP status). `EngineClient`
names every call deployments/ makes on an engine; `AsyncEngine` and the test fake
(tests/deployments/fake_engine.py) satisfy it, and tests/deployments/test_engine_client.py checks both.
The errors live in engine/errors.py (engine.sampling_params raises them, and this module imports
engine.sampling_params: one direction, no cycle) and are re-exported here.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from engine.errors import EngineDeadError, EngineError, EngineOverloadedError, InvalidRequestError
from engine.sampling_params import SamplingParams

__all__ = ["EngineClient", "EngineDeadError", "EngineError", "EngineOverloadedError", "EngineStats",
           "GenerateRequest", "InvalidRequestError", "ModelFacts", "RequestOutput", "TokenLogprob", "Tokenizer"]
T = TypeVar("T")


class LayersDroppedError(EngineError):
    """A step needs layers whose weights this replica dropped (KunServe): it can only run them as one
    stage of a cooperative pipeline, or after restoring them."""


# The finish reason of a request that moved to another replica (engine/migration.py): its local stream ends
# there and the consumer goes on with the destination's stream.
HANDED_OFF = "migrated"

@dataclass(frozen=True)
class GenerateRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams
    arrival_time: float = 0.0  # time.monotonic() when the HTTP layer received it
    priority: int = 0  # lower is more urgent (vLLM's `priority`); scales the SLO targets (engine/core/slo.py)
    model: str | None = None  # which of the engine's models (an EngineGroup serves several); None: its default
    # the choices of one OpenAI request (n > 1) carry one group and the same prompt: the engine prefills it once
    # and forks its KV for each choice (engine/core/forks.py); None: a request on its own
    prompt_group: str | None = None


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
    # on the output that carries the request's first token: arrival -> its first prompt chunk scheduled, and
    # that -> the first token (vLLM's request_queue_time / request_prefill_time); None on every other output
    queue_time_s: float | None = None
    prefill_time_s: float | None = None

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class KVKindStats:
    """One KV kind (a layer group's page size) in Jenga's LCM allocator (the `paged` layout)."""

    kind: str  # "<owner>/g<group>"
    page_bytes: int
    bytes_held: int  # large pages the kind owns
    bytes_used: int  # its small pages in use (live and cached)
    internal_fragmentation_bytes: int  # held - used: free small pages inside its large pages


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
    ttft_growth: float = 1.0  # recent TTFT over this replica's unloaded baseline (engine/core/ttft_growth.py)
    kv_kinds: tuple[KVKindStats, ...] = ()  # per kind, paged layout only (loose chunks have no kinds)
    # an EngineGroup's models, each with its own stats (these fields are then their sums): (model, stats)
    per_model: tuple[tuple[str, EngineStats], ...] = ()


class Tokenizer(Protocol):
    """The tokenizer calls the layers above make (a transformers fast tokenizer has them)."""

    chat_template: str | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


class ModelFacts(Protocol):
    """What the HTTP layer reads of the model's configuration (engine.model.config.ModelConfig)."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]


class EngineClient(Protocol):
    """Everything deployments/ calls on an engine. Contract:

    - `generate` is an async generator: validation and overload errors (`InvalidRequestError`,
      `EngineOverloadedError`, `EngineDeadError`) are raised at the first `__anext__`, before anything is
      yielded; the last output has `finish_reason` set; closing the generator early aborts the request.
    - `stats()` and `memory_telemetry()` are cheap snapshots, safe to call from the event loop at any time.
    - `check_health()` raises `EngineDeadError` once the engine cannot serve any more.
    - `for_model(name)` is the client of one of `model_names` (its tokenizer, limits, stats; its requests
      go to that model); KeyError for a model not served. With one model it is the engine itself.
    - Live migration (deployments/migration/) runs only where `supports_migration` is True; then
      `run_in_engine(function, *args)` runs `function(<the engine's LLMEngine>, *args)` on the engine's own
      thread between two steps (the `engine.migration` functions), `stream_attached` subscribes to a request's
      outputs before `attach(<LLMEngine>, *args)` puts it into the engine, and `end_stream` delivers a last
      output (finish_reason "migrated") to a local stream. An engine without migration still has the three
      methods; deployments/ never calls them on it.
    """

    model_name: str  # the default model (requests that name none)
    model_names: tuple[str, ...]  # every model this engine serves, the default first
    max_model_len: int
    tokenizer: Tokenizer
    model_config: ModelFacts
    supports_migration: bool

    def for_model(self, name: str) -> EngineClient: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    async def check_health(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def memory_telemetry(self) -> list[dict]: ...

    async def run_in_engine(self, function: Callable[..., T], *args: object) -> T: ...

    def stream_attached(self, request_id: str, attach: Callable[..., object],
                        *args: object) -> AsyncIterator[RequestOutput]: ...

    def end_stream(self, request_id: str, output: RequestOutput) -> None: ...
