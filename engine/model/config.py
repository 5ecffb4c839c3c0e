"""The shape of a decoder, independent of where its weights come from.

One `ModelConfig` describes SmolLM2, Llama, Mistral, Qwen2, Qwen3 and Gemma 3: the Llama family differs
only in a few switches (qk-norm, attention bias, per-layer sliding window), which are fields here rather
than model classes; Gemma 3 (`gemma3_text`, its own model class in engine/model/gemma3.py) adds a local
RoPE base, a query scale and an optional final logit soft-cap. It is built from a Hugging Face
`config.json` dict or from GGUF metadata.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LAYER_KINDS = (FULL_ATTENTION, SLIDING_ATTENTION)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF model_type: a key of HF_FAMILIES (SmolLM1/2 are "llama")
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # Non-default RoPE variants (llama3, linear, yarn, ...) as sorted (key, value) pairs so the config
    # stays hashable; None means plain RoPE. Keys follow HF's `rope_parameters` minus `rope_theta`.
    rope_scaling: tuple[tuple[str, Any], ...] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    layer_types: tuple[str, ...]  # one of LAYER_KINDS per layer
    sliding_window: int | None  # tokens a sliding layer attends to (including itself); None if no such layer
    use_qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    attention_bias: bool  # Qwen2: q/k/v projections carry a bias
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    # Gemma 3 only (None elsewhere): sliding layers' own RoPE base, the query scale 1/sqrt(scalar),
    # and tanh soft-capping of the final logits.
    rope_local_theta: float | None = None
    query_pre_attn_scalar: int | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types must be a tuple of {self.num_layers} kinds, got {self.layer_types!r}")
        unknown = set(self.layer_types) - set(LAYER_KINDS)
        if unknown:
            raise ValueError(f"unknown layer kinds {sorted(unknown)}; expected {LAYER_KINDS}")
        has_sliding = SLIDING_ATTENTION in self.layer_types
        if has_sliding and (self.sliding_window is None or self.sliding_window <= 0):
            raise ValueError("sliding_attention layers need a positive sliding_window")
        if not has_sliding and self.sliding_window is not None:
            raise ValueError("sliding_window is set but no layer is sliding_attention")
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, tuple) or not all(
                isinstance(item, tuple) and len(item) == 2 for item in self.rope_scaling
            ):
                raise ValueError(
                    f"rope_scaling must be a tuple of (key, value) pairs, got {self.rope_scaling!r}")
            hash(self.rope_scaling)  # values must be frozen too (lists become tuples in _freeze)
        if not isinstance(self.eos_token_ids, tuple) or not all(
            isinstance(t, int) and 0 <= t < self.vocab_size for t in self.eos_token_ids
        ):
            raise ValueError(
                f"eos_token_ids must be a tuple of token ids < vocab_size, got {self.eos_token_ids!r}")
        if self.bos_token_id is not None and not 0 <= self.bos_token_id < self.vocab_size:
            raise ValueError(f"bos_token_id {self.bos_token_id} outside the vocabulary")

        if self.architecture == GEMMA3 and (self.rope_local_theta is None or self.query_pre_attn_scalar is None):
            raise ValueError("gemma3_text needs rope_local_theta and query_pre_attn_scalar")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def is_sliding(self, layer_index: int) -> bool:
        return self.layer_types[layer_index] == SLIDING_ATTENTION

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers config.json dict for the same model (HF reference runs, benchmarks)."""
        if self.architecture == GEMMA3:
            return self._gemma3_hf_config()
        rope_parameters = {"rope_type": "default", **(self.rope_scaling_dict or {})}
        rope_parameters["rope_theta"] = self.rope_theta
        eos = list(self.eos_token_ids)
        config: dict[str, Any] = {
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "hidden_act": "silu",
        }
        if self.architecture != "qwen2":  # Qwen2 always has q/k/v biases and no such key
            config["attention_bias"] = self.attention_bias
        if self.sliding_window is not None:
            config["sliding_window"] = self.sliding_window
            if self.architecture != "mistral":
                config["layer_types"] = list(self.layer_types)
            if self.architecture in ("qwen2", "qwen3"):
                config["use_sliding_window"] = True
        return config

    def _gemma3_hf_config(self) -> dict[str, Any]:
        full = {"rope_type": "default", **(self.rope_scaling_dict or {}), "rope_theta": self.rope_theta}
        eos = list(self.eos_token_ids)
        return {
            "model_type": GEMMA3, "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {FULL_ATTENTION: full,
                                SLIDING_ATTENTION: {"rope_type": "default", "rope_theta": self.rope_local_theta}},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else eos, "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": self.query_pre_attn_scalar, "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types), "final_logit_softcapping": self.final_logit_softcapping,
            "attn_logit_softcapping": None, "attention_bias": False,
        }

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict (transformers 4.x or 5.x spelling)."""
        model_type = config.get("model_type")
        if model_type == GEMMA3:
            return _gemma3_from_hf_config(config)
        family = HF_FAMILIES.get(model_type)
        if family is None:
            raise ValueError(f"unsupported model_type {model_type!r}; supported: {sorted(HF_FAMILIES)}")
        num_layers = int(config["num_hidden_layers"])
        num_heads = int(config["num_attention_heads"])
        hidden_size = int(config["hidden_size"])
        head_dim = config.get("head_dim") or hidden_size // num_heads
        layer_types, sliding_window = family.layer_types(config, num_layers)
        rope_theta, rope_scaling = _hf_rope(config)
        return cls(
            architecture=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            layer_types=layer_types,
            sliding_window=sliding_window,
            use_qk_norm=family.use_qk_norm,
            attention_bias=family.attention_bias(config),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=_token_ids(config.get("eos_token_id")),
        )


GEMMA3 = "gemma3_text"  # HF's model_type for Gemma 3's text decoder
GEMMA3_SLIDING_PATTERN = 6  # five sliding layers, then one global (HF's default and llama.cpp's rule)


def gemma3_layer_types(num_layers: int, pattern: int = GEMMA3_SLIDING_PATTERN) -> tuple[str, ...]:
    return tuple(FULL_ATTENTION if (i + 1) % pattern == 0 else SLIDING_ATTENTION for i in range(num_layers))


def _gemma3_from_hf_config(config: Mapping[str, Any]) -> ModelConfig:
    num_layers = int(config["num_hidden_layers"])
    parameters = config.get("rope_parameters") or {}
    if FULL_ATTENTION in parameters:  # transformers 5: one RoPE dict per layer kind
        full, local = parameters[FULL_ATTENTION], parameters.get(SLIDING_ATTENTION, {})
        theta, local_theta = float(full.get("rope_theta", 1e6)), float(local.get("rope_theta", 1e4))
        scaling = freeze_rope_scaling(full)
    else:  # transformers 4 spelling
        theta = float(config.get("rope_theta", 1e6))
        local_theta = float(config.get("rope_local_base_freq", 1e4))
        scaling = freeze_rope_scaling(config.get("rope_scaling"))
    listed = config.get("layer_types")
    layer_types = tuple(listed) if listed else gemma3_layer_types(
        num_layers, int(config.get("sliding_window_pattern") or GEMMA3_SLIDING_PATTERN))
    if config.get("attn_logit_softcapping") is not None:
        raise ValueError("Gemma 3 with attn_logit_softcapping is not supported")
    head_dim = int(config.get("head_dim", 256))
    return ModelConfig(
        architecture=GEMMA3, vocab_size=int(config["vocab_size"]), hidden_size=int(config["hidden_size"]),
        intermediate_size=int(config["intermediate_size"]), num_layers=num_layers,
        num_heads=int(config["num_attention_heads"]), num_kv_heads=int(config["num_key_value_heads"]),
        head_dim=head_dim, rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)), rope_theta=theta,
        rope_scaling=scaling, max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)), layer_types=layer_types,
        sliding_window=int(config["sliding_window"]) if SLIDING_ATTENTION in layer_types else None,
        use_qk_norm=True, attention_bias=False, bos_token_id=config.get("bos_token_id"),
        eos_token_ids=_token_ids(config.get("eos_token_id")), rope_local_theta=local_theta,
        query_pre_attn_scalar=int(config.get("query_pre_attn_scalar", head_dim)),
        final_logit_softcapping=config.get("final_logit_softcapping"),
    )


@dataclass(frozen=True)
class HfFamily:
    """What differs between the supported HF model types."""

    use_qk_norm: bool
    # How the family decides which layers use a sliding window.
    sliding_rule: str  # "none" | "all_if_window" | "layer_types" | "qwen"
    bias_rule: str  # "config" (attention_bias key, default False) | "always" | "never"

    def attention_bias(self, config: Mapping[str, Any]) -> bool:
        if self.bias_rule == "config":
            return bool(config.get("attention_bias", False))
        return self.bias_rule == "always"

    def layer_types(self, config: Mapping[str, Any], num_layers: int) -> tuple[tuple[str, ...], int | None]:
        # Each rule is transformers' own reading of the config, so HF computes the same masks.
        window = config.get("sliding_window")
        listed = config.get("layer_types")
        if self.sliding_rule == "qwen":
            # Qwen2/3 drop the window unless use_sliding_window; then layer_types, or every layer
            # from max_window_layers upward, slide.
            if not config.get("use_sliding_window", False):
                window = None
            first_sliding = int(config.get("max_window_layers", num_layers))
            default = tuple(
                SLIDING_ATTENTION if i >= first_sliding else FULL_ATTENTION for i in range(num_layers)
            )
            kinds = default if listed is None else tuple(listed)
        elif self.sliding_rule == "layer_types" and listed is not None:
            kinds = tuple(listed)
        elif self.sliding_rule in ("layer_types", "all_if_window"):
            # Mistral ignores layer_types (transformers warns and slides every layer).
            kinds = (SLIDING_ATTENTION,) * num_layers
        else:
            kinds = (FULL_ATTENTION,) * num_layers
        if window is None:
            kinds = (FULL_ATTENTION,) * num_layers
        if SLIDING_ATTENTION not in kinds:
            return kinds, None
        return kinds, int(window)


HF_FAMILIES: dict[str, HfFamily] = {
    "llama": HfFamily(use_qk_norm=False, sliding_rule="none", bias_rule="config"),
    "mistral": HfFamily(use_qk_norm=False, sliding_rule="all_if_window", bias_rule="config"),
    "ministral": HfFamily(use_qk_norm=False, sliding_rule="layer_types", bias_rule="never"),
    "qwen2": HfFamily(use_qk_norm=False, sliding_rule="qwen", bias_rule="always"),
    "qwen3": HfFamily(use_qk_norm=True, sliding_rule="qwen", bias_rule="config"),
}


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def freeze_rope_scaling(parameters: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...] | None:
    """Normalise RoPE scaling to frozen items; plain RoPE ("default" or nothing) is None."""
    if not parameters:
        return None
    items = {("rope_type" if k == "type" else k): v for k, v in parameters.items() if k != "rope_theta"}
    if items.get("rope_type", "default") == "default":
        return None
    return tuple(sorted((k, _freeze(v)) for k, v in items.items()))


def _hf_rope(config: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    # transformers 5 folds rope_theta and rope_scaling into one `rope_parameters` dict.
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    return float(theta), freeze_rope_scaling(parameters)


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(dict.fromkeys(int(v) for v in value))


# GGUF `general.architecture` -> HF model_type.
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": GEMMA3,
}


def model_config_from_gguf(metadata: Mapping[str, Any], tensor_names: Collection[str]) -> ModelConfig:
    """Build from GGUF key/value metadata and the file's tensor names (for tying and bias)."""
    gguf_arch = metadata.get("general.architecture")
    if gguf_arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {gguf_arch!r}; supported: {sorted(GGUF_ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        return metadata.get(f"{gguf_arch}.{name}", default)

    num_layers = int(key("block_count"))
    num_heads = int(key("attention.head_count"))
    hidden_size = int(key("embedding_length"))
    vocab_size = key("vocab_size")
    if vocab_size is None:
        vocab_size = len(metadata["tokenizer.ggml.tokens"])
    window = key("attention.sliding_window")
    head_dim = int(key("attention.key_length") or key("rope.dimension_count") or hidden_size // num_heads)
    gemma: dict[str, Any] = {}
    if gguf_arch == "gemma3":
        # GGUF records neither the layer pattern, the local RoPE base nor the query scale: llama.cpp
        # hard-codes them for gemma3 (pattern 6, base 10000, 1/sqrt(head_dim)); so do transformers' defaults.
        layer_types = gemma3_layer_types(num_layers)
        gemma = dict(rope_local_theta=10000.0, query_pre_attn_scalar=head_dim,
                     final_logit_softcapping=key("final_logit_softcapping"))
    else:
        layer_types = ((SLIDING_ATTENTION if window else FULL_ATTENTION),) * num_layers
    scaling_type = key("rope.scaling.type")
    rope_scaling = None
    if scaling_type not in (None, "none"):
        rope_scaling = freeze_rope_scaling({
            "rope_type": scaling_type,
            "factor": key("rope.scaling.factor"),
            "original_max_position_embeddings": key("rope.scaling.original_context_length"),
        })
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[gguf_arch],
        vocab_size=int(vocab_size),
        hidden_size=hidden_size,
        intermediate_size=int(key("feed_forward_length")),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(key("attention.head_count_kv", num_heads)),
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(key("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        layer_types=layer_types,
        sliding_window=int(window) if window else None,
        use_qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=_token_ids([t for t in (eos, eot) if t is not None]),
        **gemma,
    )
