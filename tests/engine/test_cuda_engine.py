"""The engine on an NVIDIA GPU: greedy tokens equal transformers' (fp32, same GPU) with the CUDA VMM backend,
contiguous and paged KV, LayerKV's copy staging (a CUDA stream) and KunServe's drop / restore (pinned host
copy). Tiny random Llama and Qwen3 checkpoints with a numbered tokenizer, so nothing needs the embedded
GGUF. GPU tests: `pytest -m gpu`; skipped without a GPU and cuda-python.

`ELASTIC_SERVE_TEST_DEVICE=cpu pytest -m gpu tests/engine/test_cuda_engine.py` runs the same checks on the
CPU with KV pages of 2 MiB (the CUDA granule), to debug them on a machine without a GPU."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from engine.api import GenerateRequest
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.text.tokenizer import numbered_tokenizer
from tests.engine.engine_helpers import ScriptedOffload, assert_pool_idle, collect_steps, greedy, run_all
from tests.engine.reference import hf_greedy, make_tiny_random_checkpoint

DEVICE = os.environ.get("ELASTIC_SERVE_TEST_DEVICE", "cuda")
HAS_GPU = torch.cuda.is_available() and importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None)
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(DEVICE == "cuda" and not HAS_GPU, reason="needs an NVIDIA GPU and cuda-python")]

NUM_NEW = 12
VOCAB = 512
# Token pages of 2 MiB on the CPU too (the CUDA backend's granule): 2 MiB / (2 KV heads x 16 dims x 4 bytes)
CPU_PAGE_TOKENS = (2 << 20) // (2 * 16 * 4)


@pytest.fixture(scope="module")
def tokenizer():
    return numbered_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
    return {arch: make_tiny_random_checkpoint(tmp_path_factory.mktemp(f"cuda-{arch}"), arch=arch,
                                              tokenizer=tokenizer, seed=3)
            for arch in ("llama", "qwen3")}


@pytest.fixture(scope="module")
def prompts():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (length,), generator=generator).tolist() for length in (5, 17, 40, 71)]


@pytest.fixture(scope="module")
def references(checkpoints, prompts):
    """transformers' greedy tokens on the same device, fp32."""
    from transformers import AutoModelForCausalLM

    out = {}
    for arch, directory in checkpoints.items():
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).to(DEVICE).eval()
        out[arch] = hf_greedy(model, prompts, NUM_NEW)
        del model
    return out


def config(directory, **overrides) -> EngineConfig:
    base = dict(model=str(directory), device=DEVICE, dtype="float32", max_model_len=256, max_num_seqs=8,
                max_num_batched_tokens=32, device_memory_bytes=512 << 20, host_buffer_bytes=64 << 20,
                tokens_per_page=16 if DEVICE == "cuda" else CPU_PAGE_TOKENS, enable_prefix_caching=False)
    base.update(overrides)
    return EngineConfig(**base)


def assert_same(ours: dict[str, list[int]], reference: list[list[int]]) -> None:
    for index, expected in enumerate(reference):
        got = ours[f"r{index}"][: len(expected)]
        assert got == expected, f"prompt {index}: {got} != {expected}"


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: sliding-window layers (window 8) beside full ones
def test_greedy_tokens_equal_transformers_on_the_device(checkpoints, tokenizer, prompts, references, arch, layout):
    engine = LLMEngine(config(checkpoints[arch], kv_layout=layout), tokenizer=tokenizer)
    try:
        assert engine.pool.backend.name == ("cuda" if DEVICE == "cuda" else "host")
        assert engine.model.embed.device.type == DEVICE
        assert engine.kv_spec.page_bytes == 2 << 20  # the KV page grew to the CUDA granule
        assert_same(run_all(engine, prompts, greedy(NUM_NEW)), references[arch])
        assert_pool_idle(engine)
    finally:
        engine.close()


def test_layerwise_offload_stages_host_layers_on_a_copy_stream(checkpoints, tokenizer, prompts, references):
    from engine.core.layer_staging import CudaStreamCopies, ThreadCopies

    offloaded = {"r0": (), "r1": (2, 3), "r2": (1, 2, 3), "r3": (0, 2)}
    engine = LLMEngine(config(checkpoints["llama"], kv_offload="layerwise", kv_staging="copy"), tokenizer=tokenizer)
    try:
        assert isinstance(engine.runner.copies, CudaStreamCopies if DEVICE == "cuda" else ThreadCopies)
        if DEVICE == "cuda":
            assert engine.kv.host_buffer.is_pinned
        engine.scheduler.offload = ScriptedOffload(engine.kv, engine.scheduler.slo, offloaded)
        tokens: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            engine.add_request(GenerateRequest(f"r{index}", tuple(prompt), greedy(NUM_NEW)))
        collect_steps(engine, tokens, steps=1)
        assert engine.kv.offloaded_layers("r2") == offloaded["r2"]
        collect_steps(engine, tokens)
        assert_same(tokens, references["llama"])
        assert engine.staging.bytes_fetched > 0
        assert_pool_idle(engine)
        assert engine.kv.host_buffer.used_bytes == 0
    finally:
        engine.close()


def test_dropped_layers_restore_from_the_pinned_host_copy(checkpoints, tokenizer, prompts, references):
    engine = LLMEngine(config(checkpoints["qwen3"], enable_parameter_dropping=True), tokenizer=tokenizer)
    try:
        arena = engine.rank.arena
        if DEVICE == "cuda":
            assert arena.host.is_pinned
        pointers = [parameter.data_ptr() for parameter in _weights(engine)]
        assert_same(run_all(engine, prompts, greedy(NUM_NEW)), references["qwen3"])
        free = engine.pool.num_free()
        freed = engine.drop_layers(range(0, 2))
        assert freed == arena.layer_chunks(range(0, 2)) > 0 and engine.pool.num_free() == free + freed
        assert engine.restore_layers(range(0, 2)) == freed and not arena.dropped_layers
        assert [parameter.data_ptr() for parameter in _weights(engine)] == pointers
        assert_same(run_all(engine, prompts, greedy(NUM_NEW)), references["qwen3"])
        assert_pool_idle(engine)
    finally:
        engine.close()


def _weights(engine) -> list[torch.Tensor]:
    return [value for layer in engine.model.layers for value in layer.values() if isinstance(value, torch.Tensor)]
