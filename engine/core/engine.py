"""LLMEngine: one replica's engine, synchronous. The step loop is `schedule() -> run() -> update()`.

Everything it keeps on the device comes from one ElasticPool: weights (`weights` balloon), the KV
cache (`kv`) and the activation workspace (`activations`). `AsyncEngine` runs this loop in a
background thread; nothing here knows about asyncio or Ray.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING

from engine.api import EngineStats, GenerateRequest, InvalidRequestError, KVKindStats, LayersDroppedError, RequestOutput
from engine.config import EngineConfig
from engine.core.chunk_policy import create_chunk_policy
from engine.core.layer_staging import StagingStats
from engine.core.request import Request, RequestStatus
from engine.core.runner import ModelRunner
from engine.core.sampler import Sampler, SamplingState
from engine.core.sampling_workspace import SampledRows
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.ttft_growth import TtftGrowth, expected_ttft_s
from engine.device.rank import RankState, build_rank
from engine.device.weight_arena import WEIGHTS_CLIENT
from engine.text.detokenizer import IncrementalDetokenizer
from engine.text.tokenizer import load_tokenizer
from engine.weights import resolve_model_source

if TYPE_CHECKING:
    from engine.parallel.executor import TensorParallelExecutor
from memory.kv import KV_CLIENT, KVCacheManager
from memory.kv.balloon import KVBalloon
from memory.kv.host_tier import HostChunkTier

logger = logging.getLogger(__name__)


def kv_kinds_telemetry(kinds) -> dict[str, dict[str, int]]:
    """Per KV kind of the LCM allocator: its small page, the bytes its large pages hold, the bytes in use."""
    return {t.kind: {"page_bytes": t.small_page_bytes, "bytes_held": t.bytes_held, "bytes_used": t.bytes_used,
                     "internal_fragmentation_bytes": t.internal_fragmentation_bytes} for t in kinds}


class LLMEngine:
    supports_migration = True  # engine/migration.py works on it

    def __init__(self, config: EngineConfig, tokenizer=None, executor: TensorParallelExecutor | None = None,
                 rank: RankState | None = None, kv_balloon: KVBalloon | None = None, name: str | None = None):
        """`rank`, `kv_balloon`, `name`: this engine is one model of several sharing a pool (an EngineGroup
        placed its weights in `rank` and shares its activation workspace and `kv_balloon`, where this
        engine's KV kinds are `<name>/g<group>`); `name` is the model's name (default: its source's)."""
        self.config = config
        self.executor = executor
        self.source = resolve_model_source(config.model)
        self.model_name = name or self.source.name
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(self.source)
        if executor is not None:
            executor.start()
        all_reduce = executor.all_reduce if executor is not None else None
        if rank is None:
            rank = build_rank(config, 0, config.tensor_parallel_size, all_reduce)
        self.rank = rank
        self.dtype = rank.dtype
        self.model_config = model_config = rank.model_config
        self.max_model_len = rank.max_model_len
        self.kv_spec = rank.kv_spec
        self.pool = rank.pool
        self.model = rank.model
        self.workspace = rank.workspace
        self.peak_activation_bytes = rank.peak_activation_bytes
        layout_log = executor.layout_log if executor is not None else None
        host_tier = None
        if config.kv_offload == "layerwise" and config.staging_mode == "in_place":
            host_tier = HostChunkTier(rank.pool.backend, rank.kv_spec.page_bytes,
                                      config.host_buffer_bytes // rank.kv_spec.page_bytes)
        self.kv = KVCacheManager(rank.kv_spec, rank.pool, rank.dtype, host_buffer=rank.host_buffer,
                                 enable_prefix_caching=config.enable_prefix_caching, layout_log=layout_log,
                                 layout=config.kv_layout, evictor=config.kv_evictor,
                                 host_tier=host_tier, balloon=kv_balloon,
                                 owner=KV_CLIENT if name is None else name)
        self.sampler = Sampler(model_config.eos_token_ids)
        self.staging = StagingStats()  # LayerKV: bytes staged from the host (written by the runner)
        self.runner = ModelRunner(self.model, self.kv, self.workspace, self.sampler, executor, config.staging_mode,
                                  self.staging)
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                preemption_mode=config.preemption_mode,
                tpot_slo_ms=config.tpot_slo_ms,
                ttft_slo_ms=config.ttft_slo_ms,
                kv_offload=config.kv_offload,
                memory_arbiter=config.memory_arbiter,
                priority_scale=config.priority_scale,
            ),
            self.kv,
            self.runner.activation_chunks_charged_to_kv,
            chunk_policy=create_chunk_policy(
                config.max_num_batched_tokens, config.max_prefill_chunk_tokens,
                self.runner.activation_chunks_charged_to_kv, lambda tokens: self.kv.chunks_to_grow(None, tokens)),
        )
        self.eos_token_ids = set(model_config.eos_token_ids)
        self.num_steps = 0
        self._failed_steps = 0  # in a row: see fail_running
        self.ttft = TtftGrowth()
        # set by a cooperative pair (engine/cooperative/pair.py) around a drop and a restore
        self.drop_state = "normal"
        self.pipeline_bubble_ratio = 0.0

    # ---- requests ------------------------------------------------------------------------------
    def validate(self, request: GenerateRequest) -> None:
        """Raises InvalidRequestError for a request that can never run here."""
        prompt = request.prompt_token_ids
        params = request.sampling
        if request.model is not None and request.model != self.model_name:
            raise InvalidRequestError(f"this engine serves {self.model_name!r}, not {request.model!r}", param="model",
                                      code="model_not_found")
        if not prompt:
            raise InvalidRequestError("the prompt must contain at least one token", param="prompt")
        cap = self.config.max_logprobs
        if params.logprobs is not None and (cap is None or params.logprobs > cap):
            served = "this server does not return logprobs" if cap is None else f"at most {cap} are allowed"
            raise InvalidRequestError(f"logprobs: {served} (max_logprobs), got {params.logprobs}", param="logprobs")
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
        if self.kv.chunks_to_grow(None, total) > self.kv_capacity_chunks():
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
                priority=request.priority,
                prompt_group=request.prompt_group,
                arrived_unloaded=not self.scheduler.waiting and not self.scheduler.swapped,
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

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.model_name,)

    @property
    def max_in_flight(self) -> int:
        """Requests an AsyncEngine accepts at once (running and waiting) before it sheds load."""
        return self.config.max_num_waiting + self.config.max_num_seqs

    def fail_running(self, error: Exception) -> list[RequestOutput]:
        """A step failed: its running requests end with finish_reason "error" (the others go on). A failure
        with no running request to blame, or the second in a row, ends every request the engine holds (but
        those paused for a migration): a failure that repeats (the scheduler's own, say) would otherwise
        spin the loop forever while the waiting requests never hear of it."""
        self._failed_steps += 1
        victims = list(self.scheduler.running)
        if not victims or self._failed_steps > 1:
            victims = [request for request in self.scheduler.requests.values()
                       if request.status is not RequestStatus.PAUSED]
        outputs = []
        for request in victims:
            self.scheduler.finish(request, "error")
            outputs.append(RequestOutput(request.request_id, (), "", finish_reason="error", error=str(error),
                                         num_prompt_tokens=len(request.prompt_token_ids),
                                         num_output_tokens=len(request.output_token_ids)))
        return outputs

    # ---- the step loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        missing = self.runner.missing_layers()
        if missing:  # checked before scheduling: a refused step must not have grown any KV
            raise LayersDroppedError(f"layers {sorted(missing)} are dropped here; restore them or run the "
                                     "requests on a cooperative pipeline")
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        started = time.perf_counter()
        result = self.runner.run(plan, self._sampling_states(plan))
        self.scheduler.cost_model.observe_step(plan.num_tokens, (time.perf_counter() - started) * 1e3,
                                               self.staging.bytes_fetched_last_step, self.staging.copy_ms_last_step)
        outputs = self.update(plan, result)
        self._failed_steps = 0
        return outputs

    def _sampled_requests(self, plan: SchedulerOutput) -> list[Request]:
        """In row order: decodes, then the prefill chunks that sample; each followed by its forks (n > 1)."""
        chunks = list(plan.decodes) + [chunk for chunk in plan.prefills if chunk.samples]
        forks = dict(plan.forks)
        requests = self.scheduler.requests
        return [requests[request_id] for chunk in chunks
                for request_id in (chunk.request_id, *forks.get(chunk.request_id, ()))]

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
            is_first = False
            if request.first_token_time is None:
                request.first_token_time = now
                is_first = len(request.output_token_ids) == 1  # its very first token (not one after a migration)
                if is_first:
                    self.ttft.observe(request.arrival_time, now, self._expected_ttft_s(request),
                                      request.arrived_unloaded)
            reason = self._token_finish_reason(request, token)
            if reason == "stop":  # EOS / stop token ids are not part of the text (as OpenAI does)
                step = request.detokenizer.step([], is_last=True)
            else:  # the last step flushes text held back for a possible stop string
                step = request.detokenizer.step([token], is_last=reason is not None)
            if step.stop_reached:
                reason = "stop"
            output = self._output(request, (token,), step.text_delta, reason, logprob)
            outputs.append(with_first_token_times(output, request) if is_first else output)
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

    # ---- parameter dropping (KunServe) -----------------------------------------------------------
    def drop_layers(self, layers: range) -> int:
        """Gives the weights of `layers` back to the pool and returns the chunks freed: the very next
        schedule can hand them to KV. Until they are restored this engine cannot step on its own
        (LayersDroppedError); engine/cooperative/ runs its requests on a pipeline with a peer."""
        freed = self.rank.arena.drop_layers(layers)
        self.model.dropped_layers = self.rank.arena.dropped_layers
        return freed

    def restore_layers(self, layers: range) -> int:
        """Copies the layers' weights back from the host copy into fresh pool chunks; returns the chunks
        taken. All or nothing: PoolExhausted (KV holds the memory) leaves them dropped."""
        taken = self.rank.arena.restore_layers(layers)
        self.model.dropped_layers = self.rank.arena.dropped_layers
        return taken

    @property
    def dropped_weight_bytes(self) -> int:
        return self.rank.arena.dropped_bytes

    # ---- observation -----------------------------------------------------------------------------
    def _expected_ttft_s(self, request: Request) -> float:
        return expected_ttft_s(self.scheduler.cost_model, len(request.prompt_token_ids),
                               self.config.max_num_batched_tokens)

    def ttft_growth(self) -> float:
        """Recent TTFT over this replica's unloaded baseline (engine/core/ttft_growth.py), counting the
        requests still queued for their first token."""
        queued = [(r.arrival_time, self._expected_ttft_s(r)) for r in self.scheduler.waiting
                  if r.first_token_time is None]
        return self.ttft.growth(time.monotonic(), queued)

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
            kv_chunks_cached=self.kv.num_cached_chunks(),
            kv_offloaded_layers=sum(self.kv.offloaded_requests_per_layer()),
            kv_host_bytes=self.kv.num_offloaded_host_chunks * self.kv.spec.page_bytes,
            kv_bytes_fetched=self.staging.bytes_fetched,
            kv_bytes_fetched_last_step=self.staging.bytes_fetched_last_step,
            slo_attained=self.scheduler.attainment.num_attained,
            slo_finished=self.scheduler.attainment.num_finished,
            drop_state=self.drop_state,
            dropped_weight_bytes=self.dropped_weight_bytes,
            pipeline_bubble_ratio=self.pipeline_bubble_ratio,
            ttft_growth=self.ttft_growth(),
            kv_kinds=tuple(KVKindStats(t.kind, t.small_page_bytes, t.bytes_held, t.bytes_used,
                                       t.internal_fragmentation_bytes) for t in self.kv.kind_telemetry().values()),
        )

    def memory_telemetry(self) -> list[dict]:
        """One pool telemetry dict per tensor-parallel rank (the workers' are gathered)."""
        local = self.pool.telemetry().to_dict()
        local["kv_residency"] = {  # LayerKV: where the running requests' layers live
            "offloaded_requests_per_layer": self.kv.offloaded_requests_per_layer(),
            "host_bytes": self.kv.num_offloaded_host_chunks * self.kv.spec.page_bytes,
            "bytes_fetched": self.staging.bytes_fetched,
            "bytes_fetched_last_step": self.staging.bytes_fetched_last_step,
        }
        local["kv_kinds"] = kv_kinds_telemetry(self.kv.kind_telemetry().values())  # Jenga: per KV kind (paged)
        if self.executor is None:
            return [local]
        return self.executor.gather_telemetry(local)

    def kv_capacity_chunks(self) -> int:
        """Chunks KV could ever hold: the budget less the weights and one full step's workspace
        (or KV's own share, under a fixed split)."""
        shared = self.pool.num_chunks - self.pool.num_held(WEIGHTS_CLIENT) - self.runner.activation_chunks(
            self.config.max_num_batched_tokens, SampledRows.plain(1))
        share = self.pool.policy.headroom(KV_CLIENT, 0)
        return shared if share is None else min(share, shared)

    def max_tokens_that_fit(self, num_prompt_tokens: int) -> int:
        """The largest max_tokens a request with this prompt can ask for (context and memory)."""
        capacity = self.kv_capacity_chunks()
        low, high = 0, self.max_model_len
        while low < high:  # chunks_to_grow is monotone in the token count
            middle = (low + high + 1) // 2
            if self.kv.chunks_to_grow(None, middle) <= capacity:
                low = middle
            else:
                high = middle - 1
        return max(0, low - num_prompt_tokens)

    def close(self) -> None:
        for request in list(self.scheduler.requests.values()):
            self.scheduler.finish(request, "abort")
        if self.executor is not None:
            self.executor.stop()
        self.kv.close()
        self.rank.close()


def with_first_token_times(output: RequestOutput, request: Request) -> RequestOutput:
    """`output` (its first token) with the request's queue and prefill times, where both are known and its
    arrival is on this process's clock (not a request adopted from another replica before its first token)."""
    scheduled, arrived, first = request.first_scheduled_time, request.arrival_time, request.first_token_time
    if scheduled is None or first is None or not arrived <= scheduled <= first:
        return output
    return dataclasses.replace(output, queue_time_s=scheduled - arrived, prefill_time_s=first - scheduled)
