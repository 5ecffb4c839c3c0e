"""Load a Hugging Face checkpoint directory (config.json + *.safetensors)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from engine.model.config import ModelConfig

# Buffers some checkpoints carry that the config already determines.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def read_model_config(directory: Path) -> ModelConfig:
    config = ModelConfig.from_hf_config(json.loads((directory / "config.json").read_text()))
    # generate() stops on generation_config's eos ids, which may list more than config.json
    # (chat models add their end-of-turn token); stop on the same ones so outputs match HF.
    generation_path = directory / "generation_config.json"
    if generation_path.exists():
        extra = json.loads(generation_path.read_text()).get("eos_token_id")
        extra = [] if extra is None else [extra] if isinstance(extra, int) else list(extra)
        merged = tuple(dict.fromkeys([*config.eos_token_ids, *extra]))
        config = dataclasses.replace(config, eos_token_ids=merged)
    return config


def load_safetensors(
    directory: Path, dtype: torch.dtype, show_progress: bool = True
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    config = read_model_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    weights: dict[str, torch.Tensor] = {}
    with tqdm(desc=f"Loading {directory.name}", unit="tensor", disable=not show_progress) as progress:
        for file in files:
            with safe_open(str(file), framework="pt") as reader:
                for name in reader.keys():  # noqa: SIM118 (safe_open is not a dict)
                    progress.update()
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    weights[name] = reader.get_tensor(name).to(dtype).contiguous()
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        raise ValueError(f"{directory}: lm_head.weight missing and tie_word_embeddings is false")
    return config, weights
