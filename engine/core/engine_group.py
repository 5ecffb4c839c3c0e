"""EngineGroup: several models served from one replica's ElasticPool (Jenga's multi-model case).

One pool holds everything: every model's weights (the `weights` balloon; each model's WeightArena places
its layers there), every model's KV (one `KVBalloon` in the `kv` balloon: each model's KV manager
attaches its layer groups as kinds `<model>/g<group>`, small pages of different sizes cut from large pages
sized by their LCM, memory/kv/balloon.py) and one ActivationWorkspace, sized to the largest step of any
model. `step()` runs the models' engines one after the other, so the workspace never serves two steps at
once; each engine's scheduler leaves room for its own step's workspace, and KV of either model takes back
whatever the workspace is not using between steps. A large page no kind uses goes back to the pool, so one
model's KV, the other's, and the activations balloon against each other.

The pool's chunk is one layer's K (or V) page of every model: its size is a common multiple of every
model's K bytes per token and the backend's granularity (`shared_page_bytes`), so each model's page holds
a different number of tokens (SmolLM2 bf16: 128 tokens x 384 B = 48 KiB; Gemma 3: 96 tokens x 512 B).
Limits: tensor_parallel_size 1, the `paged` KV layout (only it shares an LCM balloon), the `elastic` pool
policy; no live migration and no parameter dropping (AsyncEngine declares `supports_migration` False).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields, replace

from engine.api import EngineStats, GenerateRequest, InvalidRequestError, KVKindStats, RequestOutput
from engine.config import EngineConfig
from engine.core.engine import LLMEngine, kv_kinds_telemetry
from engine.device.activation_workspace import ActivationWorkspace
from engine.device.rank import kv_bytes_per_token, place_rank, plan_rank
from engine.device.weight_arena import placed_bytes
from engine.weights import EMBEDDED_MODELS, load_weights, resolve_model_source
from memory import ElasticPool, HostBuffer, create_backend
from memory.kv.balloon import KVBalloon

logger = logging.getLogger(__name__)

# the same for every model of a pool (the first config's are taken; a different value is an error)
SHARED_FIELDS = ("device", "vmm_backend", "device_memory_bytes", "host_buffer_bytes", "dtype", "pool_policy",
                 "kv_layout", "tensor_parallel_size", "num_threads", "stream_chunks_per_s")


def shared_page_bytes(tokens_per_page: int, bytes_per_token: Sequence[int], granularity: int) -> int:
    """The smallest common multiple of every model's K bytes per token and the granularity that holds at
    least `tokens_per_page` tokens of the model with the fewest bytes per token."""
    unit = math.lcm(granularity, *bytes_per_token)
    return -(-tokens_per_page * min(bytes_per_token) // unit) * unit


def model_name_of(model: str | None) -> str:
    """What clients call a model: its registered short name (`smollm2-135m`), else its source's name."""
    if model is None or str(model).lower() in EMBEDDED_MODELS:
        return str(model or "smollm2-135m").lower()
    return resolve_model_source(model).name


class EngineGroup:
    """The models of one pool, stepped in turn; the LLMEngine calls AsyncEngine makes, routed by model."""

    supports_migration = False
    executor = None

    def __init__(self, configs: Sequence[EngineConfig], tokenizers: Mapping[str, object] | None = None):
        if len(configs) < 2:
            raise ValueError("an EngineGroup serves at least two models (one model: LLMEngine)")
        first = configs[0]
        for config in configs[1:]:
            different = [name for name in SHARED_FIELDS if getattr(config, name) != getattr(first, name)]
            if different:
                raise ValueError(f"models of one pool must agree on {different}")
        if first.kv_layout != "paged" or first.pool_policy != "elastic" or first.tensor_parallel_size != 1:
            raise ValueError("several models in one pool need kv_layout paged, pool_policy elastic and "
                             "tensor_parallel_size 1")
        if any(config.enable_parameter_dropping for config in configs):
            raise ValueError("parameter dropping is not supported with several models in one pool")
        names = [model_name_of(config.model) for config in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"a model is listed twice: {names}")
        backend = create_backend(first.backend_name)
        loaded = [load_weights(resolve_model_source(config.model), config.torch_dtype, show_progress=False)
                  for config in configs]
        per_token = [kv_bytes_per_token(model_config, config.torch_dtype)[0]
                     for config, (model_config, _) in zip(configs, loaded, strict=True)]
        chunk = shared_page_bytes(min(config.tokens_per_page for config in configs), per_token, backend.granularity)
        plans = [plan_rank(config, backend.granularity, loaded=weights, page_bytes=chunk)
                 for config, weights in zip(configs, loaded, strict=True)]
        weight_bytes = sum(placed_bytes(plan.segment_bytes, chunk) for plan in plans)
        peak = max(plan.peak_activation_bytes for plan in plans)
        if weight_bytes + peak // 8 > first.device_memory_bytes:
            raise ValueError(f"device memory {first.device_memory_bytes} B cannot hold the models' weights "
                             f"({weight_bytes} B) and a minimal activation workspace")
        host_buffer = HostBuffer(first.host_buffer_bytes, chunk, first.device) if first.host_buffer_bytes else None
        self.pool = ElasticPool(backend, first.device_memory_bytes, chunk, "elastic", host_buffer=host_buffer)
        self.engines: dict[str, LLMEngine] = {}
        try:
            self.workspace = ActivationWorkspace(self.pool, peak)
            self.balloon = KVBalloon(self.pool)
            for name, plan in zip(names, plans, strict=True):
                tokenizer = (tokenizers or {}).get(name)
                self.engines[name] = LLMEngine(plan.config, tokenizer, rank=place_rank(plan, self.pool, self.workspace),
                                               kv_balloon=self.balloon, name=name)
        except BaseException:
            self._close_parts()
            raise
        self.model_names = tuple(self.engines)
        default = self.engines[self.model_names[0]]
        self.model_name = default.model_name
        self.config = default.config
        self.tokenizer = default.tokenizer
        self.model_config = default.model_config
        self.max_model_len = default.max_model_len
        self._model_of: dict[str, str] = {}  # request id -> model, while the request is in an engine
        logger.info("one pool of %d x %d B chunks serves %s", self.pool.num_chunks, chunk, ", ".join(
            f"{name} ({engine.kv_spec.tokens_per_page}-token pages)" for name, engine in self.engines.items()))

    # ---- requests, routed by GenerateRequest.model -----------------------------------------------
    def engine(self, model: str | None) -> LLMEngine:
        name = self.model_name if model is None else model
        if name not in self.engines:
            raise InvalidRequestError(f"The model `{name}` is not served here (models: {list(self.engines)}).",
                                      param="model", code="model_not_found")
        return self.engines[name]

    def validate(self, request: GenerateRequest) -> None:
        self.engine(request.model).validate(request)

    def add_request(self, request: GenerateRequest) -> None:
        if request.request_id in self._model_of:
            raise InvalidRequestError(f"request id {request.request_id!r} is already running", param="request_id")
        engine = self.engine(request.model)
        engine.add_request(request)
        self._model_of[request.request_id] = engine.model_name

    def abort(self, request_id: str) -> RequestOutput | None:
        model = self._model_of.pop(request_id, None)
        return None if model is None else self.engines[model].abort(request_id)

    @property
    def has_work(self) -> bool:
        return any(engine.has_work for engine in self.engines.values())

    @property
    def max_in_flight(self) -> int:
        return sum(engine.max_in_flight for engine in self.engines.values())

    @property
    def num_steps(self) -> int:
        """Steps that ran, over the models (AsyncEngine waits instead of spinning when a step() ran none)."""
        return sum(engine.num_steps for engine in self.engines.values())

    def step(self) -> list[RequestOutput]:
        """One step of every model that has work, one after the other (they share the workspace). A
        failing step fails that model's running requests only."""
        outputs: list[RequestOutput] = []
        for name, engine in self.engines.items():
            if not engine.has_work:
                continue
            try:
                outputs.extend(engine.step())
            except Exception as error:  # noqa: BLE001 - the other model's step still runs
                logger.exception("step of %s failed", name)
                outputs.extend(engine.fail_running(error))
        for output in outputs:
            if output.is_finished:
                self._model_of.pop(output.request_id, None)
        return outputs

    def fail_running(self, error: Exception) -> list[RequestOutput]:
        outputs = [output for engine in self.engines.values() for output in engine.fail_running(error)]
        for output in outputs:
            self._model_of.pop(output.request_id, None)
        return outputs

    def max_tokens_that_fit(self, num_prompt_tokens: int) -> int:
        return self.engines[self.model_name].max_tokens_that_fit(num_prompt_tokens)

    # ---- observation -----------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        """The models' sums (the KV the pool could still give is shared: counted once), each model's own
        stats in `per_model`."""
        per_model = tuple((name, engine.stats()) for name, engine in self.engines.items())
        return merge_stats([stats for _, stats in per_model], per_model)

    def memory_telemetry(self) -> list[dict]:
        """One pool: its telemetry, every KV kind of the shared balloon, and per model its weights and kinds."""
        local = self.pool.telemetry().to_dict()
        local["kv_kinds"] = kv_kinds_telemetry(self.balloon.telemetry().values())
        local["models"] = {
            name: {"weights_bytes": engine.rank.arena.held_bytes,
                   "kv_tokens_per_page": engine.kv_spec.tokens_per_page,
                   "kv_kinds": sorted(engine.kv.kind_telemetry())}
            for name, engine in self.engines.items()}
        return [local]

    def close(self) -> None:
        self._close_parts()

    def _close_parts(self) -> None:
        for engine in self.engines.values():
            engine.close()
        self.engines = {}
        if hasattr(self, "workspace"):
            self.workspace.close()
        self.pool.close()


def merge_stats(stats: Sequence[EngineStats], per_model: tuple[tuple[str, EngineStats], ...]) -> EngineStats:
    """One EngineStats for models sharing a pool: counts summed, the pool's free KV once."""
    summed = {field.name: sum(getattr(s, field.name) for s in stats) for field in fields(EngineStats)
              if field.type in ("int", int) and field.name != "kv_chunks_free"}
    used = summed["kv_chunks_used"]
    free = max(s.kv_chunks_free for s in stats)
    kinds: tuple[KVKindStats, ...] = tuple(kind for s in stats for kind in s.kv_kinds)
    return replace(stats[0], **summed, kv_chunks_free=free, kv_usage=used / max(1, used + free), kv_kinds=kinds,
                   pipeline_bubble_ratio=max(s.pipeline_bubble_ratio for s in stats),
                   ttft_growth=max(s.ttft_growth for s in stats), per_model=per_model)
