"""Gemma 3's text decoder (`gemma3_text`) running one flat batch of tokens, like `LlamaModel`.

What differs from the Llama family, each written the way transformers computes it so fp32 greedy
tokens match:
- embeddings scaled by sqrt(hidden) (the scale cast to the weights' dtype first);
- RMSNorm scales by (1 + w), in fp32, and casts once at the end; the stored weight is w (the GGUF
  loader subtracts the 1 llama.cpp adds), and (1 + w) is precomputed here in fp32;
- four norms per layer: input and post-attention around attention, pre- and post-feed-forward around
  the MLP; the post-norms act on the block's output before the residual add;
- q/k RMSNorm per head before RoPE; sliding layers use their own RoPE base (`rope_local_theta`),
  global layers the model's (with its scaling);
- queries scaled by query_pre_attn_scalar^-1/2 (the attention backends scale by head_dim^-1/2, so the
  queries are pre-multiplied only when the two differ);
- a GELU(tanh)-gated MLP; an optional tanh soft-cap of the final logits.
The workspace plan, sharding and weight placement follow `LlamaModel` (same buffers, same ShardPlan).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.api import LayersDroppedError
from engine.attention import AttentionBackend, LayerAttentionSpec
from engine.core.forward_batch import ForwardBatch
from engine.model.config import SLIDING_ATTENTION, ModelConfig
from engine.model.linear import TorchLinear
from engine.model.llama import Allocator, LayerHook, LlamaModel, ShardPlan, _rows, place_embedding
from engine.model.rope import apply_rope, cos_sin_table, inverse_frequencies


class Gemma3Model(LlamaModel):
    """Same constructor, workspace plan, `forward` and stage interface as LlamaModel; its own weights,
    norms, RoPE tables, attention and MLP blocks."""

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
    ):
        self.config = config
        self.dtype = dtype
        self.attention = attention
        self.linear = linear or TorchLinear()
        self.shard = shard or ShardPlan.for_rank(config, 0, 1)
        self.all_reduce = all_reduce
        self.num_heads = len(self.shard.heads)
        self.num_kv_heads = len(self.shard.kv_heads)
        self.q_size = self.num_heads * config.head_dim
        self.kv_size = self.num_kv_heads * config.head_dim
        # The backends scale scores by head_dim^-1/2; Gemma wants query_pre_attn_scalar^-1/2.
        scalar = config.query_pre_attn_scalar
        self.query_factor = None if scalar == config.head_dim else math.sqrt(config.head_dim / scalar)

        # `layer`: whose pages the tensor goes on (None: shared by every layer), see WeightArena
        def place(tensor: torch.Tensor, layer: int | None = None) -> torch.Tensor:
            return allocate(tensor.to(dtype).contiguous(), layer)

        def place_norm(weight: torch.Tensor, layer: int | None = None) -> torch.Tensor:
            return allocate((1.0 + weight.float()).contiguous(), layer)  # fp32, as HF's Gemma3RMSNorm

        def place_matrix(tensor: torch.Tensor, layer: int | None = None):  # stored the linear backend's way
            return self.linear.place(tensor.to(dtype).contiguous(), lambda placed: allocate(placed, layer))

        self.embed, self.lm_head = place_embedding(self.linear, weights, dtype, allocate, place_matrix)
        self.embed_scale = torch.tensor(config.hidden_size**0.5, dtype=torch.float32).to(dtype)
        self.final_norm = place_norm(weights["model.norm.weight"])
        self.layers = [self._load_layer(weights, i, functools.partial(place_matrix, layer=i),
                                        functools.partial(place_norm, layer=i)) for i in range(config.num_layers)]
        self.dropped_layers: frozenset[int] = frozenset()  # weights given back to the pool (KunServe)
        positions = max_positions or config.max_position_embeddings
        global_freq = inverse_frequencies(config.head_dim, config.rope_theta, dict(config.rope_scaling or ()))
        local_freq = inverse_frequencies(config.head_dim, config.rope_local_theta, None)
        self.rope_tables = {
            kind: place(cos_sin_table(positions, freq, torch.float32))
            for kind, freq in (("global", global_freq), ("local", local_freq))
        }

    def _load_layer(self, weights: dict[str, torch.Tensor], index: int, place_matrix, place_norm) -> dict:
        c, s, d = self.config, self.shard, self.config.head_dim
        prefix = f"model.layers.{index}."
        attn = prefix + "self_attn."
        mlp = prefix + "mlp."
        columns = slice(s.mlp_columns.start, s.mlp_columns.stop)
        sliding = c.layer_types[index] == SLIDING_ATTENTION
        return {
            "input_norm": place_norm(weights[prefix + "input_layernorm.weight"]),
            "post_attention_norm": place_norm(weights[prefix + "post_attention_layernorm.weight"]),
            "pre_mlp_norm": place_norm(weights[prefix + "pre_feedforward_layernorm.weight"]),
            "post_mlp_norm": place_norm(weights[prefix + "post_feedforward_layernorm.weight"]),
            "q_norm": place_norm(weights[attn + "q_norm.weight"]),
            "k_norm": place_norm(weights[attn + "k_norm.weight"]),
            "qkv": place_matrix(torch.cat([
                _rows(weights[attn + "q_proj.weight"], s.heads, d),
                _rows(weights[attn + "k_proj.weight"], s.kv_heads, d),
                _rows(weights[attn + "v_proj.weight"], s.kv_heads, d),
            ])),
            "o": place_matrix(weights[attn + "o_proj.weight"][:, s.heads.start * d : s.heads.stop * d]),
            "gate_up": place_matrix(torch.cat([weights[mlp + "gate_proj.weight"][columns],
                                        weights[mlp + "up_proj.weight"][columns]])),
            "down": place_matrix(weights[mlp + "down_proj.weight"][:, columns]),
            "rope": "local" if sliding else "global",
            "spec": LayerAttentionSpec(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=d,
                                       sliding_window=c.sliding_window if sliding else None),
        }

    # ---- forward ---------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Gemma's order: normalise and scale by (1 + w) in fp32, cast once (`weight` holds 1 + w)."""
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return torch.mul(normed, weight, out=out)

    def forward_stage(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                      buffers: dict[str, torch.Tensor], layers: range, embed: bool,
                      layer_hook: LayerHook | None = None) -> torch.Tensor:
        """Runs `layers` over buffers["hidden"] (embedding the tokens first when `embed`), as
        LlamaModel.forward_stage (a cooperative pipeline stage); returns that buffer."""
        missing = self.dropped_layers.intersection(layers)
        if missing:
            raise LayersDroppedError(f"layers {sorted(missing)} are dropped on this replica")
        hidden = buffers["hidden"]
        if embed:
            self.linear.rows(self.embed, batch.input_ids, hidden)
            hidden.mul_(self.embed_scale)
        rope = {}
        for kind, table in self.rope_tables.items():
            rows = table[batch.positions]  # [T, 2, D] fp32
            rope[kind] = (rows[:, 0:1].to(self.dtype), rows[:, 1:2].to(self.dtype))
        for index in layers:
            layer = self.layers[index]
            if layer_hook is not None:
                layer_hook.before(index)
            self._attention_block(layer, hidden, *rope[layer["rope"]], kv_caches[index], batch, buffers)
            if layer_hook is not None:  # layer-wise KV offloading: this layer's KV is written
                layer_hook.after(index)
            self._mlp_block(layer, hidden, buffers)
        return hidden

    def compute_logits(self, batch: ForwardBatch, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final norm, lm head and soft-cap over the sampled rows of buffers["hidden"] (fp32)."""
        hidden = buffers["hidden"]
        logits = buffers["logits"]
        if batch.logits_indices.numel() == 0:
            return logits[:0]
        last = buffers["last_hidden"]
        torch.index_select(hidden, 0, batch.logits_indices, out=last)
        normed_last = self._rms_norm(last, self.final_norm, last)
        self.linear(normed_last, self.lm_head, logits)  # fp32 logits (the backend casts bf16 products)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            logits.div_(cap).tanh_().mul_(cap)
        return logits

    def _attention_block(self, layer, hidden, cos, sin, kv_cache, batch, buffers) -> None:
        num_tokens, head_dim = hidden.shape[0], self.config.head_dim
        normed = self._rms_norm(hidden, layer["input_norm"], buffers["normed"])
        qkv = buffers["qkv"]
        self.linear(normed, layer["qkv"], qkv)
        q = qkv[:, : self.q_size].view(num_tokens, self.num_heads, head_dim)
        k = qkv[:, self.q_size : self.q_size + self.kv_size].view(num_tokens, self.num_kv_heads, head_dim)
        v = qkv[:, self.q_size + self.kv_size :].view(num_tokens, self.num_kv_heads, head_dim)
        q = apply_rope(self._rms_norm(q, layer["q_norm"], torch.empty_like(q)), cos, sin)
        k = apply_rope(self._rms_norm(k, layer["k_norm"], torch.empty_like(k)), cos, sin)
        if self.query_factor is not None:
            q = q * self.query_factor
        attn = buffers["attn"]
        self.attention.forward(layer["spec"], q, k, v, kv_cache[0], kv_cache[1], batch, attn)
        proj = buffers["proj"]
        self.linear(attn.view(num_tokens, -1), layer["o"], proj)
        if self.all_reduce is not None:
            self.all_reduce(proj)
        hidden.add_(self._rms_norm(proj, layer["post_attention_norm"], buffers["normed"]))

    def _mlp_block(self, layer, hidden, buffers) -> None:
        normed = self._rms_norm(hidden, layer["pre_mlp_norm"], buffers["normed"])
        gate_up = buffers["gate_up"]
        self.linear(normed, layer["gate_up"], gate_up)
        width = gate_up.shape[1] // 2
        act = buffers["act"]
        torch.mul(F.gelu(gate_up[:, :width], approximate="tanh"), gate_up[:, width:], out=act)
        proj = buffers["proj"]
        self.linear(act, layer["down"], proj)
        if self.all_reduce is not None:
            self.all_reduce(proj)
        hidden.add_(self._rms_norm(proj, layer["post_mlp_norm"], buffers["normed"]))
