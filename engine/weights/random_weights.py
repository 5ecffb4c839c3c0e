"""Random weights for a model that exists only as its config.json (the `random` model format).

`random:DIR` (DIR holding a Hugging Face config.json) loads tensors with the names and shapes transformers'
own class for the architecture has, drawn at random: matrices from N(0, 1/fan_in), norms 1. It is for
timing the engine at a real model's shapes without its checkpoint (vLLM's "dummy" load format): the
tokens it produces mean nothing. To keep a large model's set-up short, tensors of one shape share one
random draw (every layer gets the same values), so an 8B model costs ~1 GB of draws, not 16.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from engine.model.config import ModelConfig


def load_random(directory: Path, dtype: torch.dtype, show_progress: bool = False, seed: int = 0
                ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, {HF tensor name: random CPU tensor in `dtype`}) for `directory`/config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.weights.safetensors_loader import read_model_config

    config = read_model_config(directory)
    hf_config = AutoConfig.for_model(**json.loads((directory / "config.json").read_text()))
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    generator = torch.Generator().manual_seed(seed)
    draws: dict[tuple[int, ...], torch.Tensor] = {}
    weights: dict[str, torch.Tensor] = {}
    for name, parameter in skeleton.named_parameters():
        shape = tuple(parameter.shape)
        if shape not in draws:
            if len(shape) == 1:
                draws[shape] = torch.ones(shape, dtype=dtype)
            else:
                draws[shape] = (torch.randn(shape, generator=generator) * shape[-1] ** -0.5).to(dtype)
        weights[name] = draws[shape]
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return config, weights
