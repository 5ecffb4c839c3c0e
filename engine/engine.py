"""LLMEngine: one replica's engine, synchronous. The step loop is `schedule() -> run() -> update()`.

Everything it keeps on the device comes from one ElasticPool: weights (`weights` balloon), the KV
cache (`kv`) and the activation workspace (`activations`). `AsyncEngine` runs this loop in a
background thread; nothing here knows about asyncio or Ray.
"""

from __future__ import annotations

import logging
import time

import torch

from engine.api import EngineStats, GenerateRequest, InvalidRequestError, RequestOutput
from engine.attention import create_attention_backend
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.model.llama import LlamaModel
from engine.request import Request
from engine.runner import ModelRunner
from engine.sampler import Sampler, SamplingState
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.tokenizer import load_tokenizer
from engine.weight_arena import WEIGHTS_CLIENT, WeightArena
from engine.weights import load_weights, resolve_model_source
from engine.workspace import ACTIVATIONS_CLIENT, ActivationWorkspace
from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KV_CLIENT, KVCacheManager, KVCacheSpec

logger = logging.getLogger(__name__)


def _measure_weight_bytes(build) -> int:
    """Bytes the model's weights take once placed (dry run with a counting allocator)."""
    total = 0

    def count(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total = -(-total // 64) * 64 + tensor.numel() * tensor.element_size()
        return tensor

    build(count)
    return total


def _page_tokens(requested: int, bytes_per_token: int, granularity: int) -> int:
    """The smallest multiple of `requested` tokens whose page is a whole number of VMM granules."""
    page_tokens = requested
    while (page_tokens * bytes_per_token) % granularity:
        page_tokens += requested
    if page_tokens != requested:
        logger.info("KV page grown from %d to %d tokens to fit %d-byte granules", requested, page_tokens, granularity)
    return page_tokens


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer=None):
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = config.torch_dtype
        self.source = resolve_model_source(config.model)
        self.model_name = self.source.name
        model_config, weights = load_weights(self.source, self.dtype)
        self.model_config = model_config
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.source)
        backend = create_backend(config.backend_name)
        dtype_bytes = torch.empty((), dtype=self.dtype).element_size()
        page_tokens = _page_tokens(config.tokens_per_page,
                                   model_config.num_kv_heads * model_config.head_dim * dtype_bytes, backend.granularity)
        max_len = config.max_model_len or min(model_config.max_position_embeddings, 8192)
        self.max_model_len = max_len
        slot_len = -(-max_len // page_tokens) * page_tokens
        attention = create_attention_backend(config.attention_backend)

        def build(allocate) -> LlamaModel:
            return LlamaModel(model_config, weights, attention, self.dtype, allocate=allocate, max_positions=slot_len)

        spec = KVCacheSpec(
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            dtype_bytes=dtype_bytes,
            groups=KVCacheSpec.group_layers(
                [model_config.sliding_window if t == "sliding_attention" else None for t in model_config.layer_types]
            ),
            max_slots=config.max_num_seqs,
            max_len=slot_len,
            tokens_per_page=page_tokens,
        )
        self.kv_spec = spec
        chunk = spec.page_bytes
        weight_bytes = _measure_weight_bytes(build)
        host_buffer = HostBuffer(config.host_buffer_bytes, chunk, config.device) if config.host_buffer_bytes else None
        # activations for the largest step the scheduler may plan
        max_step_tokens = config.max_num_batched_tokens + config.max_num_seqs
        peak_activation_bytes = build(lambda t: t).buffer_plan(max_step_tokens, config.max_num_seqs).num_bytes
        self.peak_activation_bytes = peak_activation_bytes
        static_split = None
        if config.pool_policy == "static":
            weight_chunks = -(-weight_bytes // chunk)
            activation_tokens = config.static_activation_tokens or max_step_tokens
            activation_bytes = build(lambda t: t).buffer_plan(activation_tokens, config.max_num_seqs).num_bytes
            activation_chunks = -(-activation_bytes // chunk)
            total = config.device_memory_bytes // chunk
            static_split = {
                WEIGHTS_CLIENT: weight_chunks,
                ACTIVATIONS_CLIENT: activation_chunks,
                KV_CLIENT: total - weight_chunks - activation_chunks,
            }
        if weight_bytes + peak_activation_bytes // 8 > config.device_memory_bytes:
            raise ValueError(
                f"device memory {config.device_memory_bytes} B cannot hold the weights ({weight_bytes} B) "
                "and a minimal activation workspace"
            )
        self.pool = ElasticPool(backend, config.device_memory_bytes, chunk, config.pool_policy,
                                static_split=static_split, host_buffer=host_buffer)
        self.arena = WeightArena(self.pool, weight_bytes + chunk)
        self.model = build(self.arena.place)
        weights.clear()  # the placed copies live in the pool now
        self.workspace = ActivationWorkspace(self.pool, peak_activation_bytes)
        self.kv = KVCacheManager(spec, self.pool, self.dtype, host_buffer=host_buffer,
                                 enable_prefix_caching=config.enable_prefix_caching)
        self.sampler = Sampler(model_config.eos_token_ids)
        self.runner = ModelRunner(self.model, self.kv, self.workspace, self.sampler)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=max_len,
                preemption_mode=config.preemption_mode,
                tpot_slo_ms=config.tpot_slo_ms,
                ttft_slo_ms=config.ttft_slo_ms,
            ),
            self.kv,
            self.runner.activation_chunks,
        )
        self.eos_token_ids = set(model_config.eos_token_ids)
        self.num_steps = 0

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> None:
        """Raises InvalidRequestError for a request that can never run here."""
        prompt = request.prompt_token_ids
        params = request.sampling
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        total = len(prompt) + params.max_tokens
        if total > self.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{total} tokens ({len(prompt)} in the prompt, {params.max_tokens} in the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        kv_capacity = self.pool.num_chunks - self.pool.num_held(WEIGHTS_CLIENT) - self.runner.activation_chunks(
            self.config.max_num_batched_tokens, 1
        )
        if self.kv.chunks_to_grow(None, total) > kv_capacity:
            raise InvalidRequestError(
                f"{total} tokens of KV cache do not fit in this replica's memory", param="max_tokens",
                code="context_length_exceeded",
            )

    def add_request(self, request: GenerateRequest) -> None:
        self.validate(request)
        if request.request_id in self.scheduler.requests:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        prompt = list(request.prompt_token_ids)
        params = request.sampling
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt, params.skip_special_tokens, params.stop)
        self.scheduler.add(
            Request(
                request_id=request.request_id,
                prompt_token_ids=prompt,
                params=params,
                sampling=SamplingState(params, prompt),
                detokenizer=detokenizer,
                arrival_time=request.arrival_time or time.monotonic(),
            )
        )

    def abort(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            return None
        self.scheduler.finish(request, "abort")
        return self._output(request, (), "", "abort")

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        started = time.perf_counter()
        result = self.runner.run(plan, self._sampling_states(plan))
        self.scheduler.cost_model.observe(plan.num_tokens, (time.perf_counter() - started) * 1e3)
        return self.update(plan, result)

    def _sampled_requests(self, plan: SchedulerOutput) -> list[Request]:
        chunks = list(plan.decodes) + [chunk for chunk in plan.prefills if chunk.samples]
        return [self.scheduler.requests[chunk.request_id] for chunk in chunks]

    def _sampling_states(self, plan: SchedulerOutput) -> list[SamplingState]:
        return [request.sampling for request in self._sampled_requests(plan)]

    def update(self, plan: SchedulerOutput, result) -> list[RequestOutput]:
        self.num_steps += 1
        sampled = self._sampled_requests(plan)
        self.scheduler.mark_computed(plan)
        outputs = []
        now = time.monotonic()
        for request, token, logprob in zip(sampled, result.token_ids, result.logprobs, strict=True):
            request.output_token_ids.append(token)
            if request.first_token_time is None:
                request.first_token_time = now
            reason = self._token_finish_reason(request, token)
            if reason == "stop":  # EOS / stop token ids are not part of the text (as OpenAI does)
                step = request.detokenizer.step([], is_last=True)
            else:  # the last step flushes text held back for a possible stop string
                step = request.detokenizer.step([token], is_last=reason is not None)
            if step.stop_reached:
                reason = "stop"
            outputs.append(self._output(request, (token,), step.text_delta, reason, logprob))
            if reason is not None:
                self.scheduler.finish(request, reason)
        return outputs

    def _token_finish_reason(self, request: Request, token: int) -> str | None:
        params = request.params
        num_output = len(request.output_token_ids)
        if num_output >= params.min_tokens and (
            token in params.stop_token_ids or (not params.ignore_eos and token in self.eos_token_ids)
        ):
            return "stop"
        if num_output >= params.max_tokens or request.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, request: Request, new_tokens, text: str, reason: str | None, logprob=None) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=tuple(new_tokens),
            text_delta=text,
            finish_reason=reason,
            num_prompt_tokens=len(request.prompt_token_ids),
            num_output_tokens=len(request.output_token_ids),
            num_cached_tokens=request.num_cached_tokens,
            logprobs=(logprob,) if logprob is not None else (),
        )

    # ---- observation -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        used = self.kv.num_used_chunks()
        free = self.kv.num_available_chunks()
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_swapped=len(self.scheduler.swapped),
            num_preemptions=self.scheduler.num_preemptions,
            kv_chunks_used=used,
            kv_chunks_free=free,
            kv_usage=used / max(1, used + free),
            num_prefix_cache_hits=self.kv.prefix.num_hit_tokens,
            num_prefix_cache_queries=self.kv.prefix.num_queried_tokens,
        )

    def memory_telemetry(self) -> list[dict]:
        return [self.pool.telemetry().to_dict()]

    def close(self) -> None:
        for request in list(self.scheduler.requests.values()):
            self.scheduler.finish(request, "abort")
        self.kv.close()
        self.workspace.close()
        self.arena.close()
        self.pool.close()
