"""Models the simulator knows, as the fields of their Hugging Face `config.json` (registry: `MODELS`).

A `ModelSpec` is what the cost model and the memory layout need: parameter counts, KV bytes per token per
layer, which layers slide and by how much. `engine_config()` turns it into the engine's own `ModelConfig`
so that the simulated replica sizes its KV pages and its activation workspace with the engine's code
(`KVCacheSpec.group_layers`, `LlamaModel.plan_buffers`). Gemma-3's extra norms and soft-capping change no
size the simulator uses; its 5-local-to-1-global layer pattern is what matters here and is kept.

Sources (config.json on huggingface.co, read for the fields below):
- llama-3-8b: meta-llama/Meta-Llama-3-8B; llama-3-70b: meta-llama/Meta-Llama-3-70B
- qwen2.5-7b: Qwen/Qwen2.5-7B-Instruct (the Qwen class: 7:1 grouped-query attention, 152K vocabulary)
- gemma-3-12b: google/gemma-3-12b-it (text_config; sliding_window 1024, sliding_window_pattern 6)
- gemma-3-27b: google/gemma-3-27b-it (text_config; 62 layers, 16 KV heads of 128, sliding_window 1024,
  sliding_window_pattern 6)
- gemma-3-270m: google/gemma-3-270m (sliding_window 512, pattern 6)
- smollm2-135m: HuggingFaceTB/SmolLM2-135M-Instruct (the model embedded in this repository)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engine.model.config import FULL_ATTENTION, SLIDING_ATTENTION, ModelConfig


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    layer_types: tuple[str, ...]  # FULL_ATTENTION / SLIDING_ATTENTION per layer
    sliding_window: int | None = None
    dtype_bytes: int = 2  # bf16 weights, activations and KV

    @classmethod
    def from_hf(cls, name: str, config: Mapping[str, Any]) -> ModelSpec:
        """From config.json fields; `sliding_window_pattern` p makes every p-th layer global (Gemma 3)."""
        num_layers = int(config["num_hidden_layers"])
        num_heads = int(config["num_attention_heads"])
        window = config.get("sliding_window")
        pattern = config.get("sliding_window_pattern")
        if window and pattern:
            kinds = tuple(FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers))
        else:
            kinds, window = (FULL_ATTENTION,) * num_layers, None
        return cls(name, int(config["hidden_size"]), int(config["intermediate_size"]), num_layers, num_heads,
                   int(config.get("num_key_value_heads") or num_heads),
                   int(config.get("head_dim") or int(config["hidden_size"]) // num_heads),
                   int(config["vocab_size"]), bool(config.get("tie_word_embeddings", False)),
                   int(config.get("max_position_embeddings", 8192)), kinds, window)

    # ---- sizes ------------------------------------------------------------------------------------
    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer's matrices: q, k, v, o and the gated MLP (norms are negligible)."""
        h, d = self.hidden_size, self.head_dim
        attention = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        return attention + 3 * h * self.intermediate_size

    @property
    def linear_params(self) -> int:
        return self.num_layers * self.layer_params

    @property
    def lm_head_params(self) -> int:
        return self.hidden_size * self.vocab_size

    @property
    def num_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.linear_params + embeddings

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token in every layer (what a full-context copy moves per token)."""
        return self.num_layers * self.kv_bytes_per_token_layer

    def window_of(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == SLIDING_ATTENTION else None

    @property
    def num_sliding_layers(self) -> int:
        return sum(kind == SLIDING_ATTENTION for kind in self.layer_types)

    def engine_config(self) -> ModelConfig:
        """The engine's ModelConfig of the same shape (Llama block; sizes only: no weights exist)."""
        return ModelConfig(
            architecture="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers, num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=1e-6, rope_theta=10000.0,
            rope_scaling=None, max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, layer_types=self.layer_types,
            sliding_window=self.sliding_window, use_qk_norm=False, attention_bias=False, bos_token_id=None,
            eos_token_ids=())


_HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                   "tie_word_embeddings": False, "max_position_embeddings": 131072},  # 8192 natively; 3.1: 131072
    "llama-3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": False, "max_position_embeddings": 131072},
    "qwen2.5-7b": {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
                   "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
                   "tie_word_embeddings": False, "max_position_embeddings": 131072},  # with YaRN
    "gemma-3-12b": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "vocab_size": 262208,
                    "tie_word_embeddings": True, "max_position_embeddings": 131072, "sliding_window": 1024,
                    "sliding_window_pattern": 6},
    "gemma-3-27b": {"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
                    "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "vocab_size": 262208,
                    "tie_word_embeddings": True, "max_position_embeddings": 131072, "sliding_window": 1024,
                    "sliding_window_pattern": 6},
    "gemma-3-270m": {"hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18,
                     "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256, "vocab_size": 262144,
                     "tie_word_embeddings": True, "max_position_embeddings": 32768, "sliding_window": 512,
                     "sliding_window_pattern": 6},
    "smollm2-135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "tie_word_embeddings": True, "max_position_embeddings": 8192},
}

MODELS: dict[str, ModelSpec] = {name: ModelSpec.from_hf(name, config) for name, config in _HF_CONFIGS.items()}


def get_model(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}") from None
