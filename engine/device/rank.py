"""What one tensor-parallel rank keeps on its device, all taken from that device's ElasticPool.

`build_rank` is shared by rank 0 (inside LLMEngine) and by the worker ranks (engine/parallel/worker.py), so
every rank sizes its pool, pages and workspace the same way: the same KV page in tokens, the same
activation plan per step, its own shard of heads and MLP columns. It is two halves: `plan_rank` (load and
measure: KV page, weight segments, the largest step's activations) and `place_rank` (weights into a pool);
an EngineGroup (engine/core/engine_group.py) plans several models first, then places them all in one pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.attention import create_attention_backend
from engine.attention.paged_native import paged_backend
from engine.config import EngineConfig
from engine.core.sampling_workspace import peak_rows, sampling_plan
from engine.device.activation_workspace import ACTIVATIONS_CLIENT, ActivationWorkspace
from engine.device.weight_arena import WEIGHTS_CLIENT, WeightArena, measure_segments, placed_bytes
from engine.model.config import ModelConfig
from engine.model.linear_registry import create_linear
from engine.model.llama import ShardPlan
from engine.model.registry import DecoderModel, model_class
from engine.weights import load_weights, resolve_model_source
from memory import ElasticPool, HostBuffer, create_backend
from memory.host_heap import trim_host_heap
from memory.kv import KV_CLIENT, KVCacheSpec

logger = logging.getLogger(__name__)


@dataclass
class RankState:
    config: EngineConfig
    model_config: ModelConfig
    dtype: torch.dtype
    max_model_len: int
    kv_spec: KVCacheSpec
    pool: ElasticPool
    host_buffer: HostBuffer | None
    arena: WeightArena
    model: DecoderModel
    workspace: ActivationWorkspace
    peak_activation_bytes: int  # the largest step's activation plan (what a static split reserves)
    owns_pool: bool = True  # False: the pool and workspace are shared by several models (EngineGroup closes them)

    def close(self) -> None:
        if self.owns_pool:
            self.workspace.close()
        self.arena.close()
        if self.owns_pool:
            self.pool.close()


def page_tokens_for(requested: int, bytes_per_token: list[int], granularity: int) -> int:
    """The smallest multiple of `requested` tokens whose page is whole granules on every rank."""
    page_tokens = requested
    while any((page_tokens * size) % granularity for size in bytes_per_token):
        page_tokens += requested
    if page_tokens != requested:
        logger.info("KV page grown from %d to %d tokens to fit %d-byte granules", requested, page_tokens, granularity)
    return page_tokens


def static_split_chunks(weight_bytes: int, activation_bytes: int, device_memory_bytes: int,
                        chunk_bytes: int) -> dict[str, int]:
    """The static baseline's fixed shares: the weights, an activation reserve, and KV gets the rest
    (the simulator sizes its static replicas with this too)."""
    weight_chunks = -(-weight_bytes // chunk_bytes)
    activation_chunks = -(-activation_bytes // chunk_bytes)
    return {WEIGHTS_CLIENT: weight_chunks, ACTIVATIONS_CLIENT: activation_chunks,
            KV_CLIENT: device_memory_bytes // chunk_bytes - weight_chunks - activation_chunks}


def measure_weight_bytes(build: Callable, page_bytes: int = 1) -> int:
    """Bytes the model's weights take once placed, each layer on whole pages of `page_bytes`."""
    return placed_bytes(measure_segments(build), page_bytes)


@dataclass
class RankPlan:
    """Everything a rank measures before its pool exists: the model's loaded weights, its KV shape and
    page, the placed size of each weight segment and the largest step's activation plan."""

    config: EngineConfig
    model_config: ModelConfig
    dtype: torch.dtype
    max_len: int
    kv_spec: KVCacheSpec
    segment_bytes: dict
    peak_activation_bytes: int
    max_step_tokens: int
    build: Callable  # build(allocate) -> DecoderModel, placing every tensor through `allocate`
    weights: dict  # the loaded host tensors (cleared once placed)
    model_type: type


def kv_bytes_per_token(model_config: ModelConfig, dtype: torch.dtype, world_size: int = 1) -> list[int]:
    """Bytes of one token's K (or V) in one layer, per rank."""
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    return [len(ShardPlan.for_rank(model_config, r, world_size).kv_heads) * model_config.head_dim * dtype_bytes
            for r in range(world_size)]


def plan_rank(config: EngineConfig, granularity: int, rank: int = 0, world_size: int = 1,
              all_reduce: Callable[[torch.Tensor], None] | None = None, loaded: tuple | None = None,
              page_bytes: int | None = None) -> RankPlan:
    """`granularity`: the VMM backend's; `loaded`: (ModelConfig, weights) already loaded in the config's
    dtype (else loaded here); `page_bytes`: a KV page of exactly this many bytes (several models sharing
    one pool's chunk), else the smallest multiple of `tokens_per_page` tokens that is whole granules."""
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    dtype = config.torch_dtype
    model_config, weights = loaded if loaded is not None else load_weights(resolve_model_source(config.model), dtype)
    shards = [ShardPlan.for_rank(model_config, r, world_size) for r in range(world_size)]
    shard = shards[rank]
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    per_token = kv_bytes_per_token(model_config, dtype, world_size)
    if page_bytes is not None:
        if any(page_bytes % size for size in per_token):
            raise ValueError(f"a KV page of {page_bytes} B is not a whole number of {per_token} B tokens")
        page_tokens = page_bytes // per_token[0]
    else:
        page_tokens = page_tokens_for(config.tokens_per_page, per_token, granularity)
    max_len = config.max_model_len or min(model_config.max_position_embeddings, 8192)
    slot_len = -(-max_len // page_tokens) * page_tokens
    attention = create_attention_backend(config.attention_backend)
    if config.kv_layout == "paged":  # reads K/V through block tables (in place with the native kernels)
        attention = paged_backend(attention)
    linear = create_linear(config.linear_backend, config.device)

    model_type = model_class(model_config)

    def build(allocate) -> DecoderModel:
        return model_type(model_config, weights, attention, dtype, allocate=allocate, shard=shard,
                          all_reduce=all_reduce, max_positions=slot_len, linear=linear)

    spec = KVCacheSpec(
        num_layers=model_config.num_layers,
        num_kv_heads=len(shard.kv_heads),
        head_dim=model_config.head_dim,
        dtype_bytes=dtype_bytes,
        groups=KVCacheSpec.group_layers(
            [model_config.sliding_window if kind == "sliding_attention" else None for kind in model_config.layer_types]
        ),
        max_slots=config.max_num_seqs,
        max_len=slot_len,
        tokens_per_page=page_tokens,
    )
    # the largest step the scheduler may plan: a full prefill budget plus a decode for every slot
    max_step_tokens = max(config.max_num_batched_tokens, config.max_prefill_chunk_tokens or 0) + config.max_num_seqs
    plan = model_type.plan_buffers(model_config, shard, dtype, max_step_tokens, config.max_num_seqs)
    # the workspace's peak: that step's buffers and the sampler's peak
    return RankPlan(config, model_config, dtype, max_len, spec, measure_segments(build),
                    plan.num_bytes + peak_sampler_bytes(config, model_config), max_step_tokens, build, weights,
                    model_type)


def peak_sampler_bytes(config: EngineConfig, model_config: ModelConfig) -> int:
    """The sampler's temporaries at their peak: every row drawn, filtered and reporting logprobs (none
    when the engine serves no logprobs)."""
    rows = peak_rows(config.max_num_seqs, logprobs=config.max_logprobs is not None)
    return sampling_plan(rows, model_config.vocab_size).num_bytes


def place_rank(plan: RankPlan, pool: ElasticPool, workspace: ActivationWorkspace | None = None,
               keep_host_copy: bool = False) -> RankState:
    """Places the planned model's weights in `pool` (the `weights` balloon); `workspace`: an activation
    workspace shared with other models of the same pool (then the pool and workspace are not this rank's
    to close), else one of its own sized to the plan's largest step."""
    arena = WeightArena(pool, plan.segment_bytes, keep_host_copy=keep_host_copy, device=plan.config.device)
    model = plan.build(arena.place)
    arena.seal()
    plan.weights.clear()  # the placed copies live in the pool now
    owns_pool = workspace is None
    if workspace is None:
        workspace = ActivationWorkspace(pool, plan.peak_activation_bytes)
    return RankState(plan.config, plan.model_config, plan.dtype, plan.max_len, plan.kv_spec, pool, pool.host_buffer,
                     arena, model, workspace, plan.peak_activation_bytes, owns_pool)


def build_rank(config: EngineConfig, rank: int = 0, world_size: int = 1,
               all_reduce: Callable[[torch.Tensor], None] | None = None, loaded: tuple | None = None) -> RankState:
    """`loaded`: (ModelConfig, weights) already loaded in the config's dtype (the dict is emptied once the
    weights are placed: pass a copy to build several ranks from one load)."""
    backend = create_backend(config.backend_name)
    plan = plan_rank(config, backend.granularity, rank, world_size, all_reduce, loaded=loaded)
    chunk = plan.kv_spec.page_bytes
    weight_bytes = placed_bytes(plan.segment_bytes, chunk)  # each layer on pages of its own (so it can be dropped)
    if weight_bytes + plan.peak_activation_bytes // 8 > config.device_memory_bytes:
        raise ValueError(f"device memory {config.device_memory_bytes} B cannot hold the weights ({weight_bytes} B) "
                         "and a minimal activation workspace")
    static_split = None
    if config.pool_policy == "static":
        activation_tokens = config.static_activation_tokens or plan.max_step_tokens
        shard = ShardPlan.for_rank(plan.model_config, rank, world_size)
        activation_bytes = plan.model_type.plan_buffers(plan.model_config, shard, plan.dtype, activation_tokens,
                                                        config.max_num_seqs).num_bytes
        activation_bytes += peak_sampler_bytes(config, plan.model_config)  # the static split reserves it too
        static_split = static_split_chunks(weight_bytes, activation_bytes, config.device_memory_bytes, chunk)
    host_buffer = HostBuffer(config.host_buffer_bytes, chunk, config.device) if config.host_buffer_bytes else None
    pool = ElasticPool(backend, config.device_memory_bytes, chunk, config.pool_policy,
                       static_split=static_split, host_buffer=host_buffer)
    state = place_rank(plan, pool, keep_host_copy=config.enable_parameter_dropping and world_size == 1)
    del plan
    trim_host_heap()  # the load's transient host tensors, freed into the C heap (memory/host_heap.py)
    return state
