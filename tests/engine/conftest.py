"""Shared, session-scoped model fixtures for tests/engine (each is built once per test run)."""

from __future__ import annotations

import pytest
import torch

from engine.model.config import FULL_ATTENTION
from engine.text.tokenizer import load_tokenizer
from engine.weights import load_weights, resolve_model_source
from tests.engine.engine_helpers import PROMPTS
from tests.engine.reference import hf_model_from_weights, make_tiny_random_checkpoint


@pytest.fixture(scope="session")
def smollm2_source():
    return resolve_model_source(None)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_source):
    return load_tokenizer(smollm2_source)


@pytest.fixture(scope="session")
def smollm2_fp32(smollm2_source):
    """(ModelConfig, weights) of the embedded model in float32, from our loader."""
    return load_weights(smollm2_source, dtype=torch.float32, show_progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_source, smollm2_fp32):
    """transformers' Llama holding our loaded SmolLM2 tensors (test_weights shows they equal
    transformers' own GGUF tensors). It shares smollm2_fp32's tensors: neither may be modified."""
    return hf_model_from_weights(smollm2_source, dtype=torch.float32, loaded=smollm2_fp32)


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory):
    return make_tiny_random_checkpoint(tmp_path_factory.mktemp("tiny-qwen3"), arch="qwen3")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random 2-layer Llama (every layer full attention) with SmolLM2's vocabulary: quick engines and a
    quick transformers reference for scheduling and memory tests."""
    return make_tiny_random_checkpoint(tmp_path_factory.mktemp("tiny-llama"), arch="llama",
                                       layer_types=(FULL_ATTENTION,) * 2, tokenizer=smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory):
    return make_tiny_random_checkpoint(tmp_path_factory.mktemp("tiny-mistral"), arch="mistral")


@pytest.fixture(scope="session")
def prompts(smollm2_tokenizer):
    """The shared PROMPTS as SmolLM2 token ids (a module may override it with its own set)."""
    return [smollm2_tokenizer(text).input_ids for text in PROMPTS]
