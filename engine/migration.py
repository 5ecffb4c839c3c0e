"""Moving a running request between engines (Mell / Llumnix live migration), engine side.

Source: `hold` caps the request at what the destination reserved (it waits there rather than outgrow the
reservation); `copy_kv` copies the KV computed so far while the request keeps decoding (repeatable: each
stage copies only what is new); `pause` stops it and returns its full state plus the KV tail;
`release` frees it after the destination committed, or `resume` lifts the hold and continues it if the
migration failed.
Destination: `reserve` takes a slot and pages, `write_kv` stores the staged copies, `attach` makes it
an ordinary running request (or a waiting one to recompute when no KV was sent), `cancel` frees.
All functions run on the engine's own thread (AsyncEngine.run_in_engine).

A KVStage always holds every KV head, whatever the tensor-parallel size: a tensor-parallel source gathers
its ranks' heads (in rank order, which is head order), a tensor-parallel destination scatters each rank its
share (`ShardPlan`). So requests move between replicas of any TP sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.api import HANDED_OFF
from engine.core.engine import LLMEngine
from engine.core.offload_policy import LayerwiseOffload
from engine.core.request import Request, RequestStatus
from engine.core.sampler import SamplingState
from engine.core.sampling_workspace import SampledRows
from engine.host_split import HostRoom, HostSplit
from engine.model.llama import ShardPlan
from engine.sampling_params import SamplingParams
from engine.text.detokenizer import IncrementalDetokenizer


class MigrationError(RuntimeError):
    """The request cannot be migrated now (wrong state, or the destination has no room)."""


@dataclass(frozen=True)
class KVStage:
    start: int  # first token of this copy
    end: int  # one past the last token
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V as [end - start, kv_heads, head_dim]

    @property
    def num_bytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


# ---- the wire format of a KV stage (deployments/migration/kv_channel.py; KunServe's pair channel) --------
@dataclass(frozen=True)
class StageHeader:
    start: int
    end: int
    shapes: tuple[tuple[int, ...], ...]  # K0, V0, K1, V1, ... (layers may differ in heads and head size)
    dtype: str  # e.g. "float32"
    tag: int  # the point-to-point tag of this transfer

    @property
    def numel(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes)


def pack(stage: KVStage, tag: int = 0) -> tuple[StageHeader, torch.Tensor]:
    tensors = [tensor for pair in stage.layers for tensor in pair]
    dtype = tensors[0].dtype if tensors else torch.float32
    if any(tensor.dtype != dtype for tensor in tensors):
        raise ValueError("a KV stage must have one dtype")
    header = StageHeader(stage.start, stage.end, tuple(tuple(t.shape) for t in tensors),
                         str(dtype).removeprefix("torch."), tag)
    flat = torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.empty(0, dtype=dtype)
    return header, flat


def unpack(header: StageHeader, flat: torch.Tensor) -> KVStage:
    tensors, offset = [], 0
    for shape in header.shapes:
        size = math.prod(shape)
        tensors.append(flat[offset:offset + size].view(shape))
        offset += size
    return KVStage(header.start, header.end, list(zip(tensors[0::2], tensors[1::2], strict=True)))


@dataclass(frozen=True)
class RequestSnapshot:
    """Everything a request is, apart from its KV: tokens, sampling state and RNG, text state."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    output_token_ids: tuple[int, ...]
    sampling_state: dict
    detokenizer_state: dict
    arrival_time: float
    num_cached_tokens: int
    num_computed_tokens: int  # tokens whose KV exists at the source

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)


def _request(engine: LLMEngine, request_id: str) -> Request:
    request = engine.scheduler.requests.get(request_id)
    if request is None:
        raise MigrationError(f"request {request_id} is not in this engine")
    return request


def is_migratable(engine: LLMEngine, request_id: str) -> bool:
    request = engine.scheduler.requests.get(request_id)
    return request is not None and request.status is RequestStatus.RUNNING and not request.is_prefilling


# ---- source ------------------------------------------------------------------------------------
def hold(engine: LLMEngine, request_id: str, num_tokens: int) -> None:
    """The request is not decoded past `num_tokens` tokens (prompt + output) until it is paused or resumed: a
    destination reserved that many, and KV staged over a slow link must not outgrow it."""
    _request(engine, request_id).hold_at = num_tokens


def copy_kv(engine: LLMEngine, request_id: str, start: int) -> KVStage:
    """Copies the request's KV from `start` up to what is computed now; it keeps running."""
    request = _request(engine, request_id)
    if request.status not in (RequestStatus.RUNNING, RequestStatus.PAUSED):
        raise MigrationError(f"request {request_id} is {request.status.value}, not resident")
    end = request.num_computed_tokens
    return KVStage(start, end, _read_all_heads(engine, request_id, start, end) if end > start else [])


KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


def _read_all_heads(engine: LLMEngine, request_id: str, start: int, end: int) -> KVLayers:
    local = engine.kv.read_kv(request_id, start, end)
    if engine.executor is None:
        return local
    local = [(k.cpu(), v.cpu()) for k, v in local]  # the ranks' shares meet on the host
    host_pages = engine.kv.requests[request_id].host_pages  # each rank reads its heads of these from its host
    ranks = engine.executor.read_kv(engine.kv.slot_of(request_id), start, end, local, host_pages)
    return [(torch.cat([rank[layer][0] for rank in ranks], dim=1), torch.cat([rank[layer][1] for rank in ranks], dim=1))
            for layer in range(len(local))]


def _write_all_heads(engine: LLMEngine, request_id: str, start: int, layers: KVLayers) -> None:
    if engine.executor is None:
        engine.kv.write_kv(request_id, start, layers)
        return
    world_size = engine.config.tensor_parallel_size
    shares = []
    for rank in range(world_size):
        heads = ShardPlan.for_rank(engine.model_config, rank, world_size).kv_heads
        shares.append([(k[:, heads.start:heads.stop].contiguous(), v[:, heads.start:heads.stop].contiguous())
                       for k, v in layers])
    mine = engine.executor.write_kv(engine.kv.slot_of(request_id), start, shares,
                                    engine.kv.requests[request_id].host_pages)
    engine.kv.write_kv(request_id, start, mine)


def pause(engine: LLMEngine, request_id: str) -> RequestSnapshot:
    request = _request(engine, request_id)
    if not is_migratable(engine, request_id):
        raise MigrationError(f"request {request_id} is not a running decode")
    engine.scheduler.pause(request)
    return RequestSnapshot(
        request_id=request.request_id,
        prompt_token_ids=tuple(request.prompt_token_ids),
        output_token_ids=tuple(request.output_token_ids),
        sampling_state=request.sampling.export_state(),
        detokenizer_state=request.detokenizer.export_state(),
        arrival_time=request.arrival_time,
        num_cached_tokens=request.num_cached_tokens,
        num_computed_tokens=request.num_computed_tokens,
    )


def release(engine: LLMEngine, request_id: str) -> None:
    """The destination committed: free everything the paused request held here (no output)."""
    request = _request(engine, request_id)
    engine.scheduler.finish(request, HANDED_OFF)


def resume(engine: LLMEngine, request_id: str) -> None:
    """Continues a paused or held request here; a no-op otherwise (so a roll-back may always call it)."""
    request = _request(engine, request_id)
    request.hold_at = None
    if request.status is RequestStatus.PAUSED:
        engine.scheduler.resume(request)


# ---- destination -------------------------------------------------------------------------------
def reserve(engine: LLMEngine, request_id: str, num_tokens: int) -> bool:
    """Takes a slot and pages for `num_tokens` tokens of KV (+1 page of growth, within the slot). False if no room
    or longer than this engine's max_model_len. With
    `kv_offload: layerwise` a request whose whole KV does not fit on the device gets its top layers on the
    host (the offload policy's admission rule: `layers_to_import`)."""
    if request_id in engine.scheduler.requests or request_id in engine.kv.requests or num_tokens > engine.max_model_len:
        return False
    # the growth page stops at the slot's end: a page past it would be the next slot's first (a stale mapping that
    # a later request's grow tripped over, "page N is already mapped", and the served engine loop died)
    room = min(num_tokens + engine.kv_spec.tokens_per_page, engine.kv_spec.max_len)
    workspace = engine.runner.activation_chunks_charged_to_kv(1, SampledRows.plain(1))
    offloaded = engine.scheduler.offload.layers_to_import(num_tokens, room,
                                                          engine.kv.num_available_chunks() - workspace)
    if offloaded is None:
        return False
    return engine.kv.reserve_import(request_id, room, offloaded)


def write_kv(engine: LLMEngine, request_id: str, stage: KVStage) -> None:
    if stage.end > stage.start:
        _write_all_heads(engine, request_id, stage.start, stage.layers)


def cancel(engine: LLMEngine, request_id: str) -> None:
    if request_id in engine.kv.requests and request_id not in engine.scheduler.requests:
        engine.kv.free(request_id)


def request_from_snapshot(engine: LLMEngine, snapshot: RequestSnapshot) -> Request:
    """The request a snapshot describes, not yet in any scheduler (no KV computed)."""
    sampling = SamplingState.import_state(snapshot.sampling_state)
    params: SamplingParams = sampling.params
    return Request(
        request_id=snapshot.request_id,
        prompt_token_ids=list(snapshot.prompt_token_ids),
        params=params,
        sampling=sampling,
        detokenizer=IncrementalDetokenizer.from_state(engine.tokenizer, snapshot.detokenizer_state),
        arrival_time=snapshot.arrival_time,
        output_token_ids=list(snapshot.output_token_ids),
        num_cached_tokens=snapshot.num_cached_tokens,
    )


def attach(engine: LLMEngine, snapshot: RequestSnapshot, num_kv_tokens: int) -> Request:
    """Makes the migrated request run here. With num_kv_tokens == 0 its KV is recomputed (Mell's
    adaptive choice for short contexts); otherwise the reserved pages hold that many tokens."""
    request = request_from_snapshot(engine, snapshot)
    if num_kv_tokens == 0:
        cancel(engine, snapshot.request_id)
        engine.scheduler.add(request)  # recompute prompt + outputs, then continue decoding
        return request
    if num_kv_tokens != snapshot.num_computed_tokens:
        raise MigrationError(f"{num_kv_tokens} KV tokens written, {snapshot.num_computed_tokens} needed")
    engine.kv.finish_import(snapshot.request_id, num_kv_tokens)
    request.num_computed_tokens = num_kv_tokens
    engine.scheduler.attach(request)
    return request


# ---- what a cluster controller plans with -------------------------------------------------------
@dataclass(frozen=True)
class RequestLoad:
    request_id: str
    status: str
    num_tokens: int  # prompt + output so far
    num_remaining: int  # output tokens it may still produce (max_tokens or the context limit)
    kv_chunks: int  # pool chunks its KV takes on a destination (and, running, here)
    is_migratable: bool
    num_preemptions: int
    host_splits: tuple[HostSplit, ...] = ()  # `layerwise`: its cost with 1, 2, ... top layers on a host
    peak_chunks: int = 0  # pool chunks its KV takes at its last possible token (num_tokens + num_remaining)


def request_loads(engine: LLMEngine) -> list[RequestLoad]:
    """Every request's size and state, for migration planning (cheap: no tensor is touched). With `kv_offload:
    layerwise` a migratable request also carries what it takes with its top layers on a destination's host
    (`LayerwiseOffload.import_splits`: the splits a destination's `layers_to_import` chooses from)."""
    offload = engine.scheduler.offload
    layerwise = isinstance(offload, LayerwiseOffload)
    loads = []
    for request in engine.scheduler.requests.values():
        remaining = min(request.params.max_tokens - len(request.output_token_ids),
                        engine.max_model_len - request.num_tokens)
        needed = request.num_tokens + (0 if request.status is RequestStatus.RUNNING else 1)
        migratable = is_migratable(engine, request.request_id)
        splits = tuple(offload.import_splits(request.num_tokens, needed)) if layerwise and migratable else ()
        loads.append(RequestLoad(
            request_id=request.request_id, status=request.status.value, num_tokens=request.num_tokens,
            num_remaining=max(0, remaining), kv_chunks=engine.kv.chunks_to_grow(None, needed),
            is_migratable=migratable, num_preemptions=request.num_preemptions, host_splits=splits,
            peak_chunks=engine.kv.chunks_to_grow(None, request.num_tokens + max(0, remaining)),
        ))
    return loads


def host_room(engine: LLMEngine) -> HostRoom | None:
    """What this engine's host can take of migrated requests' top layers (None: `kv_offload: none`)."""
    offload = engine.scheduler.offload
    return offload.host_room() if isinstance(offload, LayerwiseOffload) else None


def pause_and_copy_tail(engine: LLMEngine, request_id: str, start: int | None,
                        num_preemptions: int | None = None) -> tuple[RequestSnapshot, KVStage | None]:
    """The switch-over, in one engine call: pause the request and copy the KV it computed since `start`
    (None: no copy, the destination recomputes). Refuses a request that was preempted since the staged
    copies began (recomputed KV can differ in the last bits from what was already sent)."""
    request = _request(engine, request_id)
    if num_preemptions is not None and request.num_preemptions != num_preemptions:
        raise MigrationError(f"request {request_id} was preempted during the migration")
    snapshot = pause(engine, request_id)
    if start is None:
        return snapshot, None
    return snapshot, copy_kv(engine, request_id, start)


def cost_inputs(engine: LLMEngine) -> dict[str, float]:
    """What choosing copy vs recompute needs: KV bytes per token and the fitted step cost (prefill rate)."""
    spec = engine.kv_spec
    cost = engine.scheduler.cost_model
    all_heads = engine.model_config.num_kv_heads / spec.num_kv_heads  # a stage holds every rank's heads
    return {"kv_bytes_per_token": 2 * spec.num_layers * spec.bytes_per_token * all_heads, "step_base_ms": cost.base_ms,
            "step_per_token_ms": cost.per_token_ms, "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "tokens_per_page": spec.tokens_per_page}
