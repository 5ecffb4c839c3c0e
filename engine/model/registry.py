"""Which model class runs a given architecture (HF model_type): the Llama family unless listed."""

from __future__ import annotations

from engine.model.config import GEMMA3, ModelConfig
from engine.model.gemma3 import Gemma3Model
from engine.model.llama import LlamaModel

DecoderModel = LlamaModel  # every model class is one (same constructor, workspace plan, forward, stages)

MODEL_CLASSES: dict[str, type[DecoderModel]] = {GEMMA3: Gemma3Model}


def model_class(config: ModelConfig) -> type[DecoderModel]:
    return MODEL_CLASSES.get(config.architecture, LlamaModel)
