"""A Llama-family decoder (Llama, Mistral, Qwen2/3, SmolLM) that runs one flat batch of tokens.

Every step runs all its tokens (decodes and prefill chunks together) through one matmul per
weight. Intermediates are written into the step's workspace (see `workspace.py`); weights are
placed by an allocator the caller passes in (the runner puts them into the pool's `weights`
balloon). Under tensor parallelism each rank keeps a slice of the heads and MLP columns and two
all-reduces per layer sum the partial outputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from engine.api import LayersDroppedError
from engine.attention import AttentionBackend, LayerAttentionSpec
from engine.core.forward_batch import ForwardBatch
from engine.model.buffers import BufferPlan
from engine.model.config import ModelConfig
from engine.model.decode_step import DecodeStep
from engine.model.elementwise import NativeBf16Elementwise, TorchElementwise, create_elementwise
from engine.model.linear import TorchLinear
from engine.model.rope import cos_sin_table, inverse_frequencies

# returns a pool-backed copy of the tensor, on the pages of `layer` (None: tensors every layer uses)
Allocator = Callable[..., torch.Tensor]


class LayerHook(Protocol):
    """Called around each layer's attention (engine/core/layer_staging.py stages offloaded KV)."""

    def before(self, layer: int) -> None: ...

    def after(self, layer: int) -> None: ...


@dataclass(frozen=True)
class ShardPlan:
    """Which heads and MLP columns one tensor-parallel rank owns (uneven splits allowed)."""

    kv_heads: range
    heads: range
    mlp_columns: range

    @staticmethod
    def for_rank(config: ModelConfig, rank: int, world_size: int) -> ShardPlan:
        def split(total: int) -> range:
            base, extra = divmod(total, world_size)
            start = rank * base + min(rank, extra)
            return range(start, start + base + (1 if rank < extra else 0))

        if config.num_kv_heads < world_size:
            raise ValueError(f"{config.num_kv_heads} key/value heads cannot be split over {world_size} ranks")
        kv_heads = split(config.num_kv_heads)
        group = config.num_heads // config.num_kv_heads
        heads = range(kv_heads.start * group, kv_heads.stop * group)
        return ShardPlan(kv_heads, heads, split(config.intermediate_size))


def _rows(tensor: torch.Tensor, heads: range, head_dim: int) -> torch.Tensor:
    return tensor[heads.start * head_dim : heads.stop * head_dim]


def place_embedding(linear: TorchLinear, weights: dict[str, torch.Tensor], dtype: torch.dtype,
                    allocate: Allocator, place_matrix: Callable[[torch.Tensor], object]) -> tuple:
    """(the token embedding as `linear.rows` reads it, the lm head as `linear` multiplies by it). Tied ones
    (no "lm_head.weight") are one matrix, placed once the backend's way for both (`TorchLinear.place_tied`)."""
    embed = weights["model.embed_tokens.weight"].to(dtype).contiguous()
    lm_head = weights.get("lm_head.weight")
    if lm_head is None:
        return linear.place_tied(embed, lambda placed: allocate(placed, None))
    return allocate(embed, None), place_matrix(lm_head)


class LlamaModel:
    def __init__(
        self,
        config: ModelConfig,
        weights: dict[str, torch.Tensor],
        attention: AttentionBackend,
        dtype: torch.dtype,
        allocate: Allocator = lambda tensor, layer=None: tensor,
        shard: ShardPlan | None = None,
        all_reduce: Callable[[torch.Tensor], None] | None = None,
        max_positions: int | None = None,
        linear: TorchLinear | None = None,
        elementwise: TorchElementwise | None = None,
    ):
        self.config = config
        self.dtype = dtype
        self.attention = attention
        self.linear = linear or TorchLinear()  # x @ w.T for every weight (engine/model/linear.py)
        self.shard = shard or ShardPlan.for_rank(config, 0, 1)
        self.all_reduce = all_reduce
        head_dim = config.head_dim
        self.num_heads = len(self.shard.heads)
        self.num_kv_heads = len(self.shard.kv_heads)
        self.q_size = self.num_heads * head_dim
        self.kv_size = self.num_kv_heads * head_dim

        def place(tensor: torch.Tensor, layer: int | None = None) -> torch.Tensor:
            return allocate(tensor.to(dtype).contiguous(), layer)

        def place_matrix(tensor: torch.Tensor, layer: int | None = None):  # stored the linear backend's way
            return self.linear.place(tensor.to(dtype).contiguous(), lambda placed: allocate(placed, layer))

        self.embed, self.lm_head = place_embedding(self.linear, weights, dtype, allocate, place_matrix)
        # norms, RoPE, SiLU x up (engine/model/elementwise.py): fused C kernels in bf16 on CPU
        self.ops = elementwise or create_elementwise(dtype, self.embed.device.type)
        # the MLP's product and SiLU x up in one call where the backend has it (its roundings are these ops')
        self._native_ops = isinstance(self.ops, NativeBf16Elementwise)
        self.final_norm = place(weights["model.norm.weight"])
        self.layers = [self._load_layer(weights, i, functools.partial(place, layer=i),
                                        functools.partial(place_matrix, layer=i))
                       for i in range(config.num_layers)]
        self.dropped_layers: frozenset[int] = frozenset()  # weights given back to the pool (KunServe)
        positions = max_positions or config.max_position_embeddings
        inv_freq = inverse_frequencies(head_dim, config.rope_theta, dict(config.rope_scaling or ()))
        self.rope_table = place(cos_sin_table(positions, inv_freq, torch.float32)).to(dtype)
        # small decode steps in one native call where every op is native (engine/model/decode_step.py)
        self.decode_step = DecodeStep.for_model(self)

    def _load_layer(self, weights, index: int, place, place_matrix) -> dict:
        c, s, d = self.config, self.shard, self.config.head_dim
        prefix = f"model.layers.{index}."
        attn = prefix + "self_attn."
        qkv = torch.cat(
            [
                _rows(weights[attn + "q_proj.weight"], s.heads, d),
                _rows(weights[attn + "k_proj.weight"], s.kv_heads, d),
                _rows(weights[attn + "v_proj.weight"], s.kv_heads, d),
            ]
        )
        layer = {
            "input_norm": place(weights[prefix + "input_layernorm.weight"]),
            "post_norm": place(weights[prefix + "post_attention_layernorm.weight"]),
            "qkv": place_matrix(qkv),
            "o": place_matrix(weights[attn + "o_proj.weight"][:, s.heads.start * d : s.heads.stop * d]),
            "gate_up": place_matrix(
                torch.cat(
                    [
                        weights[prefix + "mlp.gate_proj.weight"][s.mlp_columns.start : s.mlp_columns.stop],
                        weights[prefix + "mlp.up_proj.weight"][s.mlp_columns.start : s.mlp_columns.stop],
                    ]
                )
            ),
            "down": place_matrix(weights[prefix + "mlp.down_proj.weight"][:, s.mlp_columns.start : s.mlp_columns.stop]),
            "spec": LayerAttentionSpec(
                num_heads=self.num_heads,
                num_kv_heads=self.num_kv_heads,
                head_dim=d,
                sliding_window=c.sliding_window if c.layer_types[index] == "sliding_attention" else None,
            ),
        }
        if c.attention_bias:
            layer["qkv_bias"] = place(
                torch.cat(
                    [
                        _rows(weights[attn + "q_proj.bias"], s.heads, d),
                        _rows(weights[attn + "k_proj.bias"], s.kv_heads, d),
                        _rows(weights[attn + "v_proj.bias"], s.kv_heads, d),
                    ]
                )
            )
        if c.use_qk_norm:
            layer["q_norm"] = place(weights[attn + "q_norm.weight"])
            layer["k_norm"] = place(weights[attn + "k_norm.weight"])
        return layer

    # ---- workspace -------------------------------------------------------------------------
    def buffer_plan(self, num_tokens: int, num_logits: int) -> BufferPlan:
        """The activation buffers one step of `num_tokens` tokens needs (sized before it runs)."""
        return self.plan_buffers(self.config, self.shard, self.dtype, num_tokens, num_logits)

    @staticmethod
    def plan_buffers(config: ModelConfig, shard: ShardPlan, dtype: torch.dtype, num_tokens: int,
                     num_logits: int) -> BufferPlan:
        c, t, d = config, num_tokens, config.head_dim
        heads, kv_heads, mlp = len(shard.heads), len(shard.kv_heads), len(shard.mlp_columns)
        return BufferPlan(
            {
                "hidden": ((t, c.hidden_size), dtype),
                "normed": ((t, c.hidden_size), dtype),
                "qkv": ((t, (heads + 2 * kv_heads) * d), dtype),
                "attn": ((t, heads, d), dtype),
                "proj": ((t, c.hidden_size), dtype),
                "gate_up": ((t, 2 * mlp), dtype),
                "act": ((t, mlp), dtype),
                "last_hidden": ((num_logits, c.hidden_size), dtype),
                "logits": ((num_logits, c.vocab_size), torch.float32),
            }
        )

    # ---- forward ---------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, weight, out, self.config.rms_norm_eps)

    def forward(
        self,
        batch: ForwardBatch,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        buffers: dict[str, torch.Tensor],
        layer_hook: LayerHook | None = None,
    ) -> torch.Tensor:
        """Runs the step; returns fp32 logits [len(logits_indices), vocab] (a workspace view).
        `layer_hook` (layer-wise KV offloading) is told before a layer's attention and after it."""
        self.forward_stage(batch, kv_caches, buffers, range(self.config.num_layers), embed=True,
                           layer_hook=layer_hook)
        return self.compute_logits(batch, buffers)

    def forward_stage(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                      buffers: dict[str, torch.Tensor], layers: range, embed: bool,
                      layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Runs `layers` over buffers["hidden"] (first embedding the tokens when `embed`; otherwise the
        caller has put the previous stage's hidden states there); returns that buffer. A pipeline stage
        of cooperative execution runs its own layer range; `forward` runs them all.

        Each block's output projection is added to the residual stream by the next block's norm
        (`add_rms_norm`: one pass where the elementwise ops are fused), the stage's last one at its end."""
        missing = self.dropped_layers.intersection(layers)
        if missing:
            raise LayersDroppedError(f"layers {sorted(missing)} are dropped on this replica")
        hidden = buffers["hidden"]
        if embed:
            self.linear.rows(self.embed, batch.input_ids, hidden)
            if self.decode_step is not None and self.decode_step.takes(batch, kv_caches, layers, layer_hook):
                return self.decode_step.run(batch, kv_caches, buffers)
        rope = self.rope_table[batch.positions]  # [T, 2, D]
        cos, sin = rope[:, 0:1], rope[:, 1:2]
        pending = None  # the residual not yet added to `hidden`
        for index in layers:
            layer = self.layers[index]
            if layer_hook is not None:
                layer_hook.before(index)
            pending = self._attention_block(layer, hidden, pending, cos, sin, kv_caches[index], batch, buffers)
            if layer_hook is not None:  # the layer's KV is written: its write-back overlaps the MLP
                layer_hook.after(index)
            pending = self._mlp_block(layer, hidden, pending, buffers)
        if pending is not None:
            hidden.add_(pending)
        return hidden

    def compute_logits(self, batch: ForwardBatch, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final norm and lm head over the sampled rows of buffers["hidden"] (fp32, a workspace view)."""
        hidden = buffers["hidden"]
        logits = buffers["logits"]
        if batch.logits_indices.numel() == 0:  # a step of prompt chunks that sample nothing
            return logits[:0]
        last = buffers["last_hidden"]
        torch.index_select(hidden, 0, batch.logits_indices, out=last)
        normed_last = self._rms_norm(last, self.final_norm, last)
        self.linear(normed_last, self.lm_head, logits)  # fp32 logits: the sampler's argmax reads fp32
        return logits

    def _attention_block(self, layer, hidden, pending, cos, sin, kv_cache, batch, buffers) -> torch.Tensor:
        num_tokens, head_dim = hidden.shape[0], self.config.head_dim
        normed = self.ops.add_rms_norm(hidden, pending, layer["input_norm"], buffers["normed"],
                                       self.config.rms_norm_eps)
        qkv = buffers["qkv"]
        self.linear(normed, layer["qkv"], qkv, layer.get("qkv_bias"))
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.num_kv_heads, head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, head_dim)
        if "q_norm" in layer:
            q = self._rms_norm(q, layer["q_norm"], torch.empty_like(q))
            k = self._rms_norm(k, layer["k_norm"], torch.empty_like(k))
        q, k = self.ops.rope(q, k, cos, sin)
        attn = buffers["attn"]
        self.attention.forward(layer["spec"], q, k, v, kv_cache[0], kv_cache[1], batch, attn)
        proj = buffers["proj"]
        self.linear(attn.view(num_tokens, -1), layer["o"], proj)
        if self.all_reduce is not None:
            self.all_reduce(proj)
        return proj

    def _mlp_block(self, layer, hidden, pending, buffers) -> torch.Tensor:
        normed = self.ops.add_rms_norm(hidden, pending, layer["post_norm"], buffers["normed"],
                                       self.config.rms_norm_eps)
        gate_up, act = buffers["gate_up"], buffers["act"]
        if not (self._native_ops and self.linear.gate_up_silu(normed, layer["gate_up"], gate_up, act)):
            self.linear(normed, layer["gate_up"], gate_up)
            act = self.ops.silu_mul(gate_up, act)
        proj = buffers["proj"]
        self.linear(act, layer["down"], proj)
        if self.all_reduce is not None:
            self.all_reduce(proj)
        return proj
