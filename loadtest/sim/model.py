"""What the packing simulation models instead of real compute: the replica's hardware and model (its KV
cache shape and memory budget) and a cost model of step times and migration times.

Default: Llama-3-8B (bf16) on one H100-SXM 80 GB per replica. The constants are first-principles
(roofline) estimates, written out next to each field; they set the time scale of the simulation, and
every policy in a comparison runs on the same ones, so ratios between policies depend on them far less
than absolute latencies do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memory.kv import KVCacheSpec, LayerGroup
from memory.kv.layouts import LAYOUTS

GIB = 1 << 30
MIB = 1 << 20


@dataclass(frozen=True)
class ModelShape:
    """The parts of a decoder the KV cache and the cost model need (Llama-3-8B by default)."""

    name: str = "llama-3-8b"
    num_layers: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    hidden_size: int = 4096
    dtype_bytes: int = 2  # bf16
    num_params: float = 8.03e9

    def __post_init__(self) -> None:
        if min(self.num_layers, self.num_kv_heads, self.head_dim, self.hidden_size, self.dtype_bytes) < 1:
            raise ValueError("model dimensions must be >= 1")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer (what a KV copy moves per token): 128 KiB for Llama-3-8B."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        return int(self.num_params * self.dtype_bytes)


@dataclass(frozen=True)
class ReplicaConfig:
    """One replica = one GPU running one engine."""

    gpu_bytes: int = 80 * GIB
    gpu_memory_utilization: float = 0.90  # vLLM's default share of the device an engine takes
    activation_reserve_bytes: int = 3 * GIB  # activation workspace, CUDA graphs, NCCL buffers (not modelled)
    tokens_per_page: int = 1024  # a 2 MiB chunk of one layer's K (or V): 1024 tokens x 8 heads x 128 x 2 B
    max_num_seqs: int = 256  # vLLM's default batch limit
    max_num_batched_tokens: int = 2048  # chunked-prefill token budget per step
    max_model_len: int = 32768
    startup_s: float = 60.0  # a new replica serves this long after it is asked for (weights, warm-up, graphs)

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if min(self.tokens_per_page, self.max_num_seqs, self.max_num_batched_tokens) < 1:
            raise ValueError("tokens_per_page, max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.max_model_len % self.tokens_per_page:
            raise ValueError("max_model_len must be a multiple of tokens_per_page")
        if self.startup_s < 0:
            raise ValueError("startup_s must be >= 0")

    def kv_budget_bytes(self, model: ModelShape) -> int:
        """The KV pool: the engine's share of the device minus weights and the activation reserve, rounded
        down to whole pages of every layer (so the per-layer and the fused spec hold the same pages)."""
        page_all_layers = self.tokens_per_page * model.kv_bytes_per_token
        free = int(self.gpu_bytes * self.gpu_memory_utilization) - model.weight_bytes - self.activation_reserve_bytes
        if free < page_all_layers:
            raise ValueError("the model leaves no room for one KV page on this device")
        return free // page_all_layers * page_all_layers


def kv_spec(model: ModelShape, replica: ReplicaConfig, fused_layers: bool = True) -> KVCacheSpec:
    """The KV cache spec of one replica.

    `fused_layers=False` is the model as the engine lays it out: one page = one layer's K (or V) for
    `tokens_per_page` tokens = 2 MiB, so a page of all 32 layers is 64 chunks. `fused_layers=True` folds
    the layers into one (32x the KV heads): the same bytes per token and per page and the same pages, in 2
    chunks of 64 MiB instead of 64 of 2 MiB. With one layer group (all full attention) the manager always
    takes and frees a page's chunks of every layer together, so both specs make the same decisions (a
    test runs both); the fused one does 32x fewer VMM calls, which is what lets a simulated day run fast.
    """
    layers = 1 if fused_layers else model.num_layers
    heads = model.num_kv_heads * (model.num_layers if fused_layers else 1)
    return KVCacheSpec(
        num_layers=layers, num_kv_heads=heads, head_dim=model.head_dim, dtype_bytes=model.dtype_bytes,
        groups=(LayerGroup(tuple(range(layers)), None),), max_slots=replica.max_num_seqs,
        max_len=replica.max_model_len, tokens_per_page=replica.tokens_per_page)


class BookkeepingLayout:
    """A KV layout that places nothing in virtual memory. The manager's decisions (slots, blocks, which
    pool chunks back them, when they are freed) never depend on where pages are mapped, so with this
    layout it decides exactly as with `contiguous` (a test compares the two) without one VMM call per
    chunk mapped, unmapped or moved between slots: a simulated day runs about three times faster."""

    name = "bookkeeping"

    def __init__(self, spec: KVCacheSpec, backend: object, dtype: torch.dtype) -> None:
        self.spec = spec

    def layer_caches(self) -> list:
        raise NotImplementedError("the bookkeeping layout has no tensors")

    def map_block(self, slot: int, page: int, block: object) -> None:
        pass

    def unmap_block(self, slot: int, page: int, block: object) -> None:
        pass

    def move_block(self, block: object, src_slot: int, dst_slot: int, page: int) -> None:
        pass

    def block_freed(self, block: object) -> None:
        pass

    def close(self) -> None:
        pass


LAYOUTS.setdefault(BookkeepingLayout.name, BookkeepingLayout)


@dataclass(frozen=True)
class CostModel:
    """Step and migration times of Llama-3-8B bf16 on an H100-SXM 80 GB (roofline estimates).

    Decode step (every running request gets one token):
        base + per_seq * num_seqs + per_context_token * (tokens attended, summed over the batch)
    Prefill of n tokens at positions [s, s + n): per_token * n + attention * (n * s + n * n / 2).
    A step that mixes a prefill chunk with decodes costs the sum.
    """

    # 16.06 GB of weights read once per step at ~2.6 TB/s (78% of the 3.35 TB/s HBM3 peak), plus launches
    decode_base_s: float = 6.5e-3
    # per sequence: 2 x 8.03 GFLOP at ~540 TFLOP/s (55% of 989 dense bf16 TFLOP/s), sampling, bookkeeping
    decode_per_seq_s: float = 30e-6
    # per token attended: 128 KiB of K and V read at ~2.6 TB/s
    decode_per_context_token_s: float = 5.0e-8
    # per prompt token: 2 x 8.03 GFLOP at ~400 TFLOP/s (40% MFU: prefill kernels at these lengths)
    prefill_per_token_s: float = 40e-6
    # per (query, key) pair: 4 x hidden (4096) x 32 layers = 524,288 FLOP at ~400 TFLOP/s
    prefill_attention_per_pair_s: float = 1.3e-9
    # KV copy between replicas: one 200 Gb/s RDMA NIC, ~25 GB/s effective
    migration_bandwidth_bytes_per_s: float = 25e9
    # per copy migration: handshake, reserve on the destination, stage bookkeeping, the paused tail
    migration_setup_s: float = 0.02

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.migration_bandwidth_bytes_per_s <= 0:
            raise ValueError("migration_bandwidth_bytes_per_s must be > 0")

    def decode_step_s(self, num_seqs: int, num_context_tokens: int) -> float:
        if num_seqs == 0:
            return 0.0
        return (self.decode_base_s + self.decode_per_seq_s * num_seqs
                + self.decode_per_context_token_s * num_context_tokens)

    def prefill_s(self, num_tokens: int, start: int = 0) -> float:
        pairs = num_tokens * start + num_tokens * num_tokens / 2
        return self.prefill_per_token_s * num_tokens + self.prefill_attention_per_pair_s * pairs

    def step_s(self, num_seqs: int, num_context_tokens: int, prefill_chunks: list[tuple[int, int]]) -> float:
        """One step: decodes of `num_seqs` requests plus prefill chunks given as (num_tokens, start)."""
        seconds = sum(self.prefill_s(num_tokens, start) for num_tokens, start in prefill_chunks)
        if num_seqs:
            seconds += self.decode_step_s(num_seqs, num_context_tokens)
        elif prefill_chunks:
            seconds += self.decode_base_s  # the weights are read by a prefill-only step too
        return seconds

    def copy_s(self, num_tokens: int, model: ModelShape) -> float:
        return self.migration_setup_s + num_tokens * model.kv_bytes_per_token / self.migration_bandwidth_bytes_per_s

    def recompute_s(self, num_tokens: int) -> float:
        return self.prefill_s(num_tokens)
