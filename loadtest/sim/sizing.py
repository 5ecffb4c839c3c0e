"""What a simulated replica or device is made of: `ReplicaConfig`, the engine's KV spec and activation sizing
for a model, and `SharedDevice`, one device's pool shared by several models' engines (Jenga's multi-model
pool: loadtest/sim/device.py runs them)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from engine.device.activation_workspace import ActivationWorkspace
from engine.device.rank import page_tokens_for
from engine.device.weight_arena import WEIGHTS_CLIENT
from engine.model.llama import LlamaModel, ShardPlan
from loadtest.sim.hardware import get_device
from loadtest.sim.models import get_model
from memory import ElasticPool
from memory.kv import KVCacheSpec
from memory.kv.balloon import KVBalloon
from memory.page_policies import PagePolicy
from memory.vmm.sim import SimBackend

MIB = 1 << 20
DTYPE = torch.bfloat16


@dataclass(frozen=True)
class ReplicaConfig:
    model: str = "llama-3-8b"
    device: str = "h100-80g"
    gpu_memory_utilization: float = 0.90  # vLLM's default share of the device an engine takes
    pool_policy: str = "elastic"  # or "static": fixed weight / activation / KV shares
    static_activation_tokens: int | None = None  # static: activations reserved for this many tokens per step
    max_num_seqs: int = 256  # vLLM's default batch limit
    max_num_batched_tokens: int = 2048  # chunked-prefill token budget per step
    max_model_len: int = 32768
    granularity: int = 2 * MIB  # the VMM page (cuMemCreate's granularity on NVIDIA GPUs)
    fuse_layers: bool = True  # one layer group: fold the layers into one (same decisions, far fewer chunks)
    # "bookkeeping" (decides as `contiguous`, maps nothing), "bookkeeping-paged" (decides as `paged`: blocks
    # are small pages of the LCM allocator in a KVBalloon), or the engine's own "contiguous" / "paged"
    kv_layout: str = "bookkeeping"
    page_policy: Any = "lcm"  # small-page layouts: memory/page_policies.py name or PagePolicy
    fast_forward: bool = True
    kv_offload: str = "none"  # or "layerwise" (LayerKV; needs fuse_layers=False and a host buffer)
    host_buffer_bytes: int = 0  # host RAM for offloaded layers and swapped requests (bookkeeping only)
    ttft_slo_ms: float | None = None  # the scheduler's SLO targets (engine/core/slo.py)
    tpot_slo_ms: float | None = None


def kv_spec_for(config: ReplicaConfig) -> KVCacheSpec:
    """The engine's KV spec for the model (engine/device/rank.py's sizing: a page of one layer's K is whole
    VMM granules); with `fuse_layers` and one layer group, the layers folded into one."""
    model = get_model(config.model)
    groups = KVCacheSpec.group_layers([model.window_of(layer) for layer in range(model.num_layers)])
    fused = config.fuse_layers and len(groups) == 1
    layers = 1 if fused else model.num_layers
    heads = model.num_kv_heads * (model.num_layers if fused else 1)
    page_tokens = page_tokens_for(16, [model.num_kv_heads * model.head_dim * model.dtype_bytes], config.granularity)
    slot_len = -(-config.max_model_len // page_tokens) * page_tokens
    if fused:
        groups = KVCacheSpec.group_layers([model.window_of(0)])
    return KVCacheSpec(layers, heads, model.head_dim, model.dtype_bytes, groups, config.max_num_seqs, slot_len,
                       page_tokens)


def peak_activation_bytes(config: ReplicaConfig, num_tokens: int | None = None) -> int:
    """The activation workspace of the largest step (or of `num_tokens` tokens), by the engine's buffer plan."""
    engine_model = get_model(config.model).engine_config()
    tokens = num_tokens or config.max_num_batched_tokens + config.max_num_seqs
    return LlamaModel.plan_buffers(engine_model, ShardPlan.for_rank(engine_model, 0, 1), DTYPE, tokens,
                                   config.max_num_seqs).num_bytes


class SharedDevice:
    """One device whose pool several models' engines share (Jenga's multi-model pool): every model's
    weights in the `weights` balloon, their KV managers attached to one KVBalloon (so their kinds are
    small pages of one LCM allocator), one activation workspace (the device runs one step at a time)
    sized for the largest model's largest step. The configs must agree on the device, the granularity
    and the KV layout, and their KV pages must be the same size (one pool chunk)."""

    def __init__(self, configs: Sequence[ReplicaConfig],
                 page_policy: str | PagePolicy | Callable[[int], PagePolicy] = "lcm"):
        first = configs[0]
        if any((c.device, c.granularity, c.gpu_memory_utilization) != (first.device, first.granularity,
                                                                       first.gpu_memory_utilization)
               for c in configs):
            raise ValueError("the models of one device must agree on the device and its granularity")
        chunks = {kv_spec_for(config).page_bytes for config in configs}
        if len(chunks) != 1:
            raise ValueError(f"the models' KV pages differ ({sorted(chunks)} B): one pool needs one chunk size")
        self.chunk_bytes = chunk = chunks.pop()
        device = get_device(first.device)
        budget = int(device.memory_bytes * first.gpu_memory_utilization) // chunk * chunk
        self.pool = ElasticPool(SimBackend(granularity=first.granularity), budget, chunk, "elastic")
        self.pool.register(WEIGHTS_CLIENT)
        weight_chunks = sum(-(-get_model(config.model).weight_bytes // chunk) for config in configs)
        if weight_chunks >= self.pool.num_chunks:
            raise ValueError(f"the weights of {[c.model for c in configs]} do not fit on {device.name}")
        self.pool.inflate(WEIGHTS_CLIENT, weight_chunks)
        self.peak_activation_bytes = max(peak_activation_bytes(config) for config in configs)
        activation_chunks = -(-self.peak_activation_bytes // chunk)
        self.kv_budget_chunks = self.pool.num_chunks - weight_chunks - activation_chunks
        if callable(page_policy) and not isinstance(page_policy, PagePolicy):  # sized by the KV budget
            page_policy = page_policy(self.kv_budget_chunks)
        self.balloon = KVBalloon(self.pool, page_policy=page_policy)
        self.workspace = ActivationWorkspace(self.pool, self.peak_activation_bytes)

    def close(self) -> None:
        self.workspace.close()
        self.pool.close()
