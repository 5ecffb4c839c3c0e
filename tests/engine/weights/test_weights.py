"""Model sources and weight loading: GGUF (against gguf-py and transformers) and safetensors."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch
from gguf import MODEL_ARCH, GGMLQuantizationType, get_tensor_name_map
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

from engine.weights import ModelSource, load_weights, resolve_model_source
from engine.weights.dequantize import TORCH_DEQUANTIZERS, dequantize
from engine.weights.gguf_file import GgufFile
from engine.weights.gguf_loader import hf_name, unpermute_rows
from tests.engine.reference import hf_gguf_tensors


def test_resolve_named_and_default_sources(smollm2_source):
    assert resolve_model_source("smollm2") == resolve_model_source("SmolLM2") == smollm2_source
    assert smollm2_source.format == "gguf" and smollm2_source.path.is_file()
    assert smollm2_source.gguf_file == smollm2_source.path.name
    assert resolve_model_source(str(smollm2_source.path)).path == smollm2_source.path


def test_resolve_directory_and_errors(tmp_path, tiny_qwen3_dir):
    source = resolve_model_source(str(tiny_qwen3_dir))
    assert (source.format, source.directory, source.gguf_file) == ("safetensors", tiny_qwen3_dir, None)
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_model_source(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(ValueError, match="unknown model format"):
        ModelSource("onnx", tmp_path, "x")


@pytest.mark.slow  # CI time (6.5 s): the loader's own tests and every exactness test read the same file
def test_gguf_header_matches_gguf_py_reader(smollm2_source):
    from gguf import GGUFReader

    ours = GgufFile(smollm2_source.path)
    reader = GGUFReader(smollm2_source.path)
    assert [t.name for t in reader.tensors] == list(ours.tensors)
    for tensor in reader.tensors:
        info = ours.tensors[tensor.name]
        assert (info.offset, info.num_bytes, info.quant_type) == (
            tensor.data_offset, tensor.n_bytes, tensor.tensor_type)
        assert np.array_equal(ours.raw(tensor.name), tensor.data.reshape(-1).view(np.uint8))
    for key in ("llama.block_count", "llama.rope.freq_base", "tokenizer.ggml.merges", "tokenizer.chat_template"):
        assert ours.metadata[key] == reader.fields[key].contents()


@pytest.mark.parametrize("quant_type", sorted(TORCH_DEQUANTIZERS, key=int))
def test_torch_dequantizers_are_bit_identical_to_gguf_py(quant_type):
    values = np.random.default_rng(int(quant_type)).normal(size=(8, 64)).astype(np.float32)
    if quant_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        raw = values.astype(np.float16 if quant_type == GGMLQuantizationType.F16 else np.float32)
    else:
        raw = gguf_quantize(values, quant_type)
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    expected = torch.from_numpy(gguf_dequantize(raw, quant_type).astype(np.float32)).reshape(8, 64)
    assert torch.equal(dequantize(raw, quant_type, (8, 64)), expected)


def test_gguf_weights_equal_gguf_py_with_transformers_unpermute(smollm2_source, smollm2_fp32):
    """Our tensors = gguf-py's dequantization + transformers' own Q/K reverse permutation, under
    gguf-py's official GGUF<->HF name map."""
    config, weights = smollm2_fp32
    gguf = GgufFile(smollm2_source.path)
    name_map = get_tensor_name_map(MODEL_ARCH.LLAMA, config.num_layers)
    processor = LlamaTensorProcessor(
        config={"num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads})
    assert len(weights) == len(gguf.tensors) and "lm_head.weight" not in weights
    for gguf_name, info in gguf.tensors.items():
        stem, suffix = hf_name(gguf_name).rsplit(".", 1)
        assert name_map.get_name(stem) + "." + suffix == gguf_name
        expected = gguf_dequantize(gguf.raw(gguf_name), info.quant_type).reshape(info.shape)
        expected = processor.process(expected, gguf_name).weights
        assert torch.equal(weights[hf_name(gguf_name)], torch.from_numpy(np.array(expected, copy=True)))


@pytest.mark.slow
def test_gguf_weights_equal_transformers_gguf_loading(smollm2_source, smollm2_fp32):
    """The full independent check: transformers' own GGUF conversion (~20 s)."""
    _, weights = smollm2_fp32
    reference = hf_gguf_tensors(smollm2_source)
    assert set(reference) == set(weights)
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference[name].float()), name


@settings(max_examples=30, deadline=None)
@given(num_heads=st.integers(1, 4), half_head_dim=st.integers(1, 4), columns=st.integers(1, 3))
def test_unpermute_inverts_llama_cpp_permute(num_heads, half_head_dim, columns):
    rows = num_heads * half_head_dim * 2
    original = torch.arange(rows * columns, dtype=torch.float32).reshape(rows, columns)
    # llama.cpp convert_hf_to_gguf.py: reshape(n_head, 2, rows // n_head // 2, ...).swapaxes(1, 2)
    permuted = original.reshape(num_heads, 2, half_head_dim, columns).swapaxes(1, 2).reshape(rows, columns)
    assert torch.equal(unpermute_rows(permuted, num_heads), original)


def test_gguf_load_honours_dtype(smollm2_source):
    start = time.perf_counter()
    config, weights = load_weights(smollm2_source, dtype="bfloat16", show_progress=False)
    # Printed, not asserted: ~1.2 s on an idle 2-core box, several times that when the box is shared.
    print(f"GGUF load (bf16): {time.perf_counter() - start:.2f} s")
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in weights.values())
    assert weights["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (
        config.num_kv_heads * config.head_dim, config.hidden_size)
    with pytest.raises(ValueError, match="dtype"):
        load_weights(smollm2_source, dtype="int8")


@pytest.mark.parametrize("fixture", ["tiny_qwen3_dir", "tiny_mistral_dir"])
def test_safetensors_checkpoint_round_trip(fixture, request):
    directory = request.getfixturevalue(fixture)
    config, weights = load_weights(str(directory), dtype=torch.float32, show_progress=False)
    saved = load_file(str(directory / "model.safetensors"))
    assert set(weights) == set(saved)
    assert all(torch.equal(weights[name], saved[name]) for name in saved)
    hf_config = json.loads((directory / "config.json").read_text())
    assert config.layer_types == tuple(hf_config["layer_types"])
    assert config.use_qk_norm == (fixture == "tiny_qwen3_dir")
    assert ("model.layers.0.self_attn.q_norm.weight" in weights) == config.use_qk_norm


def test_tied_checkpoint_drops_lm_head_and_untied_needs_it(tmp_path, tiny_qwen3_dir):
    directory = tmp_path / "tied"
    shutil.copytree(tiny_qwen3_dir, directory)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tie_word_embeddings": True}))
    _, weights = load_weights(str(directory), dtype=torch.float32, show_progress=False)
    assert "lm_head.weight" not in weights
    saved = load_file(str(directory / "model.safetensors"))
    del saved["lm_head.weight"]
    from safetensors.torch import save_file

    save_file(saved, str(directory / "model.safetensors"))
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lm_head"):
        load_weights(str(directory), dtype=torch.float32, show_progress=False)


def test_generation_config_eos_ids_are_merged(tmp_path, tiny_qwen3_dir):
    directory = tmp_path / "chat"
    shutil.copytree(tiny_qwen3_dir, directory)
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    config, _ = load_weights(str(directory), dtype=torch.float32, show_progress=False)
    assert config.eos_token_ids == (2, 7)
