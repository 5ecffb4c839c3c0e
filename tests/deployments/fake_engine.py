"""A deterministic stand-in for engine.async_engine.AsyncEngine: an engine.api.EngineClient with every public
member AsyncEngine has (tests/deployments/test_engine_client.py compares the two).

Tokens are bytes (id = byte + 3; 0 pad, 1 BOS, 2 EOS), so any text round-trips and the tokenizer works
with engine.text.tokenizer.encode_prompt / encode_chat. The generated text is a fixed function of the prompt:
lowercase letters starting at (sum of prompt ids) mod 26, one per `token_delay_s`. KV use is counted in
chunks of `tokens_per_chunk` tokens per live request, out of `kv_total_chunks`, so routing stats and pool
telemetry move the way a real engine's do. Special prompts: containing "FAIL" -> the stream fails after
two tokens (finish_reason "error"); containing "EOS" -> EOS after three tokens (finish_reason "stop").
The fake's "engine thread" is the event loop: `run_in_engine(function, *args)` calls `function(fake, *args)`
between two of its tokens, as AsyncEngine calls it with its LLMEngine between two steps. It does not run
engine/migration.py (`supports_migration` is False); `stream_attached` works with an `attach` that calls
`fake.adopt(request, num_output_tokens)`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from engine.api import (
    EngineClient,
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    GenerateRequest,
    InvalidRequestError,
    RequestOutput,
    TokenLogprob,
)

if TYPE_CHECKING:  # (engine.config imports torch: Ray replicas of the fake start faster without it)
    from engine.config import EngineConfig
    from engine.parallel.executor import TensorParallelExecutor

T = TypeVar("T")
PAD, BOS, EOS = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


class FakeTokenizer:
    chat_template = "fake: <|role|>content per message, then <|assistant|>"
    bos_token_id = BOS
    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [byte + BYTE_OFFSET for byte in text.encode()]
        return [BOS, *ids] if add_special_tokens else ids

    def get_vocab(self) -> dict[str, int]:
        return {"<pad>": PAD, "<s>": BOS, "</s>": EOS, **{chr(byte): byte + BYTE_OFFSET for byte in range(256)}}

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        data = bytes(token_id - BYTE_OFFSET for token_id in token_ids if token_id >= BYTE_OFFSET)
        return data.decode(errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, tokenize: bool = False):
        text = "".join(f"<|{message['role']}|>{message['content']}\n" for message in messages)
        text = "<s>" + text + ("<|assistant|>" if add_generation_prompt else "")
        return self.encode(text) if tokenize else text


@dataclass(frozen=True)
class FakeModelConfig:
    vocab_size: int = VOCAB_SIZE
    eos_token_ids: tuple[int, ...] = (EOS,)


@dataclass
class _Live:
    request: GenerateRequest
    num_output_tokens: int = 0
    is_running: bool = False
    last_output: RequestOutput | None = None  # set by end_stream: the stream ends with it


@dataclass
class FakeEngine:
    model_name: str = "fake-model"
    max_model_len: int = 256
    token_delay_s: float = 0.001
    max_num_seqs: int = 8
    max_num_waiting: int = 64
    kv_total_chunks: int = 64
    tokens_per_chunk: int = 16
    num_ranks: int = 1
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)
    model_config: FakeModelConfig = field(default_factory=FakeModelConfig)
    # What happened, for assertions.
    submitted: list[GenerateRequest] = field(default_factory=list)
    finished: dict[str, str] = field(default_factory=dict)
    aborted: list[str] = field(default_factory=list)
    is_dead: bool = False
    death: str = "fake engine marked dead"
    is_started: bool = False
    rank_placements: list[dict[str, Any]] = field(default_factory=list)
    supports_migration = False  # a class attribute, as on AsyncEngine

    def __post_init__(self) -> None:
        self._live: dict[str, _Live] = {}
        self._adopted: dict[str, _Live] = {}  # put in by an `attach` of stream_attached, not yet streaming
        self._num_inflates = 0
        self._num_deflates = 0
        self._slots: asyncio.Semaphore | None = None
        self._arrival_listeners: list[Callable[[], None]] = []

    @classmethod
    def from_config(cls, config: EngineConfig, executor: TensorParallelExecutor | None = None) -> FakeEngine:
        """The fake with the config's limits (its model is always the byte tokenizer's)."""
        return cls(max_model_len=config.max_model_len or cls.max_model_len, max_num_seqs=config.max_num_seqs,
                   max_num_waiting=config.max_num_waiting, num_ranks=config.tensor_parallel_size)

    # ---- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        self.start_thread()

    def start_thread(self) -> None:
        self.is_started = True

    async def shutdown(self) -> None:
        self.stop_thread()

    def stop_thread(self) -> None:
        """Stops: every live stream ends with finish_reason "abort" at its next token."""
        self.is_started = False
        for request_id in list(self._live):
            self._mark_aborted(request_id)

    @property
    def is_running(self) -> bool:
        return self.is_started and not self.is_dead

    async def check_health(self) -> None:
        if self.is_dead:
            raise EngineDeadError(self.death)

    def die(self, reason: str) -> None:
        """Like AsyncEngine when its loop breaks: running streams raise EngineDeadError, health fails."""
        self.is_dead = True
        self.death = reason

    # ---- generation ------------------------------------------------------------------------------

    def _slots_semaphore(self) -> asyncio.Semaphore:
        if self._slots is None:  # created lazily: it must belong to the serving event loop
            self._slots = asyncio.Semaphore(self.max_num_seqs)
        return self._slots

    def _validate(self, request: GenerateRequest) -> None:
        if self.is_dead:
            raise EngineDeadError("fake engine marked dead")
        if request.request_id in self._live:
            raise InvalidRequestError(f"duplicate request id {request.request_id}", "request_id")
        if not request.prompt_token_ids:
            raise InvalidRequestError("empty prompt", "prompt")
        if len(request.prompt_token_ids) + request.sampling.max_tokens > self.max_model_len:
            raise InvalidRequestError("too long", "prompt", "context_length_exceeded")
        num_waiting = sum(1 for live in self._live.values() if not live.is_running)
        if num_waiting >= self.max_num_waiting:
            raise EngineOverloadedError("fake engine queue is full", retry_after_s=2.0)

    def output_ids(self, prompt_token_ids, num_tokens: int) -> list[int]:
        """The tokens this engine produces for a prompt (ignoring stops)."""
        start = sum(prompt_token_ids) % 26
        return [BYTE_OFFSET + ord("a") + (start + index) % 26 for index in range(num_tokens)]

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        self._validate(request)
        self.submitted.append(request)
        live = _Live(request)
        self._live[request.request_id] = live  # counted by peak_tokens before the listeners hear, as AsyncEngine
        for listener in self._arrival_listeners:
            listener()
        async for output in self._produce(live):
            yield output

    def add_arrival_listener(self, listener: Callable[[], None]) -> None:
        """As AsyncEngine's: `listener()` after each arriving request is counted."""
        self._arrival_listeners.append(listener)

    async def run_in_engine(self, function: Callable[..., T], *args: object) -> T:
        """`function(self, *args)`, run on the event loop, which is this fake's engine thread."""
        return function(self, *args)

    async def stream_attached(self, request_id: str, attach: Callable[..., object],
                              *args: object) -> AsyncIterator[RequestOutput]:
        """Runs `attach(self, *args)`, which must put `request_id` in with `adopt`, then streams it."""
        if request_id in self._live:
            raise InvalidRequestError(f"request id {request_id!r} is already running here", "request_id")
        await self.run_in_engine(attach, *args)
        live = self._adopted.pop(request_id, None)
        if live is None:
            raise InvalidRequestError(f"attach did not put {request_id!r} into the engine", "request_id")
        async for output in self._produce(live):
            yield output

    def peak_tokens(self) -> list[int]:
        """Each live request's prompt + max_tokens (at most the context), as AsyncEngine.peak_tokens."""
        return [min(self.max_model_len, len(live.request.prompt_token_ids) + live.request.sampling.max_tokens)
                for live in self._live.values()]

    def adopt(self, request: GenerateRequest, num_output_tokens: int = 0) -> None:
        """Takes over a request that already has `num_output_tokens` tokens (for `stream_attached`)."""
        self._adopted[request.request_id] = _Live(request, num_output_tokens)

    def end_stream(self, request_id: str, output: RequestOutput) -> None:
        """The request's stream yields `output` instead of its next token and ends."""
        live = self._live.get(request_id)
        if live is not None:
            live.last_output = output

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name,)

    def for_model(self, name: str) -> EngineClient:
        """One model: the fake itself (KeyError for another name, as AsyncEngine)."""
        if name != self.model_name:
            raise KeyError(name)
        return self

    def max_tokens_that_fit(self, num_prompt_tokens: int) -> int:
        """The largest max_tokens for this prompt: the context, and all of the KV chunks for one request."""
        kv_tokens = self.kv_total_chunks * self.tokens_per_chunk
        return max(0, min(self.max_model_len, kv_tokens) - num_prompt_tokens)

    async def _produce(self, live: _Live) -> AsyncIterator[RequestOutput]:
        request = live.request
        self._live[request.request_id] = live
        self._inflate()
        sampling = request.sampling
        prompt_text = self.tokenizer.decode(request.prompt_token_ids)
        num_prompt = len(request.prompt_token_ids)
        tokens = self.output_ids(request.prompt_token_ids, sampling.max_tokens)
        text = self.tokenizer.decode(tokens[:live.num_output_tokens])
        finish_reason = None
        try:
            async with self._slots_semaphore():
                live.is_running = True
                for index in range(live.num_output_tokens, len(tokens)):
                    token_id = tokens[index]
                    await asyncio.sleep(self.token_delay_s)
                    if self.is_dead:  # the loop died: the contract raises EngineDeadError in every stream
                        raise EngineDeadError(self.death)
                    if live.last_output is not None:
                        finish_reason = live.last_output.finish_reason
                        yield live.last_output
                        return
                    if request.request_id in self.aborted:
                        finish_reason = "abort"
                        yield RequestOutput(request.request_id, (), "", "abort", num_prompt, index)
                        return
                    if "FAIL" in prompt_text and index == 2:
                        finish_reason = "error"
                        yield RequestOutput(request.request_id, (), "", "error", num_prompt, index,
                                            error="fake engine failure")
                        return
                    if "EOS" in prompt_text and index == 3 and not sampling.ignore_eos:
                        token_id = EOS
                    live.num_output_tokens = index + 1
                    self._inflate()
                    delta = self.tokenizer.decode([token_id])
                    text += delta
                    if token_id == EOS:
                        finish_reason = "stop"
                    elif any(stop in text for stop in sampling.stop):
                        finish_reason = "stop"
                        cut = min(text.index(stop) for stop in sampling.stop if stop in text)
                        delta = delta[: max(0, len(delta) - (len(text) - cut))]
                    elif index + 1 == len(tokens):
                        finish_reason = "length"
                    logprobs = ()
                    if sampling.logprobs is not None:
                        top = tuple((token_id + k, -1.0 - k) for k in range(sampling.logprobs))
                        logprobs = (TokenLogprob(token_id, -0.5, top),)
                    first = index == 0  # the first token carries the engine's split of its time (fixed here)
                    yield RequestOutput(request.request_id, (token_id,), delta, finish_reason, num_prompt,
                                        index + 1, logprobs=logprobs, queue_time_s=0.25 if first else None,
                                        prefill_time_s=0.5 if first else None)
                    if finish_reason is not None:
                        return
        finally:
            if finish_reason is None:  # closed early: the contract says that aborts the request
                finish_reason = "abort"
                self._mark_aborted(request.request_id)
            self.finished[request.request_id] = finish_reason
            self._live.pop(request.request_id, None)
            self._num_deflates += 1

    async def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._mark_aborted(request_id)

    def _mark_aborted(self, request_id: str) -> None:
        if request_id not in self.aborted:
            self.aborted.append(request_id)

    # ---- state -----------------------------------------------------------------------------------

    def _inflate(self) -> None:
        self._num_inflates += 1

    def num_live(self) -> int:
        return len(self._live)

    def kv_chunks_used(self) -> int:
        return sum(math.ceil((len(live.request.prompt_token_ids) + live.num_output_tokens)
                             / self.tokens_per_chunk) for live in self._live.values())

    def stats(self) -> EngineStats:
        used = min(self.kv_chunks_used(), self.kv_total_chunks)
        running = sum(1 for live in self._live.values() if live.is_running)
        return EngineStats(num_running=running, num_waiting=len(self._live) - running, num_swapped=0,
                           num_preemptions=0, kv_chunks_used=used, kv_chunks_free=self.kv_total_chunks - used,
                           kv_usage=used / self.kv_total_chunks, num_prefix_cache_hits=0,
                           num_prefix_cache_queries=sum(len(r.prompt_token_ids) for r in self.submitted))

    def memory_telemetry(self) -> list[dict]:
        used = min(self.kv_chunks_used(), self.kv_total_chunks)
        activations = 2
        return [{
            "backend": "fake", "policy": "elastic", "budget_bytes": self.kv_total_chunks * 65536,
            "chunk_bytes": 65536, "num_chunks": self.kv_total_chunks + activations,
            "chunks_per_client": {"kv": used, "activations": activations},
            "num_free_chunks": self.kv_total_chunks - used, "num_alive_chunks": used + activations,
            "host_buffer_used_bytes": 0, "host_buffer_capacity_bytes": 1 << 20,
            "num_inflates": self._num_inflates, "num_deflates": self._num_deflates, "num_reclaims": 0,
            "num_chunks_reclaimed": 0, "num_exhausted": 0, "bytes_swapped_out": 0, "bytes_swapped_in": 0,
            **({"placement": self.rank_placements[rank]} if self.rank_placements else {}),
        } for rank in range(self.num_ranks)]


class FakeWorkerProcess:
    """Stands in for engine.parallel.worker.WorkerProcess: its run loop ends when rank 0 writes `<file>.stop`."""

    def __init__(self, rank: int, world_size: int, init_method_file: str, engine_config: EngineConfig | None):
        self.rank, self.world_size, self.init_method_file = rank, world_size, init_method_file

    def run(self) -> None:
        import os
        import time

        while not os.path.exists(self.init_method_file + ".stop"):
            time.sleep(0.05)


def create_fake_tp_engine(app_args: Any, **options: Any):
    """A fake engine whose ranks 1..N-1 are FakeWorkerProcess actors started by the real WorkerLauncher;
    /v1/memory reports where each rank runs (pid, node, placement group, Ray resources)."""
    import os

    import ray

    from deployments.cluster.tensor_parallel import WorkerLauncher
    from deployments.server import BuiltEngine

    launcher = WorkerLauncher(app_args.tensor_parallel_size, None, app_args.cpus_per_rank,
                              worker_path="tests.deployments.fake_engine:FakeWorkerProcess")
    launcher.start()
    context = ray.get_runtime_context()
    ranks = [{"pid": os.getpid(), "node_id": context.get_node_id(),
              "placement_group_id": context.get_placement_group_id(),
              "resources": context.get_assigned_resources()}, *launcher.describe_workers()]
    engine = FakeEngine(num_ranks=app_args.tensor_parallel_size, **options)
    engine.rank_placements = ranks

    def stop_ranks() -> None:
        with open(launcher.init_method_file + ".stop", "w"):
            pass  # what the real engine's shutdown does by broadcasting a stop
        launcher.shutdown()

    return BuiltEngine(engine, cleanup=stop_ranks, failed_ranks=launcher.failed_ranks)


def create_fake_engine(app_args: Any = None, **options: Any) -> FakeEngine:
    """Engine factory for the Ray Serve tests (AppArgs.engine_factory; options: engine_factory_kwargs)."""
    return FakeEngine(**options)
