"""The fused bf16 decode step (engine/model/decode_step.py) computes what the per-op path computes, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import engine.model.onednn_linear as onednn_linear
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.forward_batch import ForwardBatch
from engine.model.decode_step import MAX_ROWS
from tests.engine.engine_helpers import greedy, run_all

pytestmark = pytest.mark.skipif(not torch.cpu._is_avx512_bf16_supported(), reason="needs AVX512-BF16")

# head_dim 64 (what the vector attention takes), 3 query heads per key/value head, an intermediate size and a
# vocabulary that are not multiples of the packed blocks
CONFIG = {"vocab_size": 1000, "hidden_size": 192, "intermediate_size": 200, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False}


def _engine(tmp_path, variant: str, dtype: str = "bfloat16") -> LLMEngine:
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_type, _, intermediate = variant.partition("-")
    config = dict(CONFIG, model_type=model_type)
    if intermediate:  # a whole number of 64-output blocks: the fused step pairs gate and up columns
        config["intermediate_size"] = int(intermediate)
    if model_type == "mistral":
        config["sliding_window"] = 6  # every layer slides: decode reads only the window
    (tmp_path / "config.json").write_text(json.dumps(config))
    return LLMEngine(EngineConfig(model=f"random:{tmp_path}", dtype=dtype, num_threads=2, max_model_len=64,
                                  device_memory_bytes=64 << 20, host_buffer_bytes=0, tokens_per_page=16,
                                  enable_prefix_caching=False))


@pytest.fixture(scope="module", params=["llama", "mistral", "llama-256"])
def engine(request, tmp_path_factory):
    engine = _engine(tmp_path_factory.mktemp("decode-step") / request.param, request.param)
    yield engine
    engine.close()


# five prompts finishing at different lengths: decode steps of 5, 4, ... 1 rows; then twenty (steps of more rows
# than a work unit of the packed kernel: products split by rows as well as by output blocks)
CASES = {"small": ([[5 + i] * (3 + 3 * i) for i in range(5)], [greedy(4 + 2 * i) for i in range(5)], [1, 2, 3, 4, 5]),
         "wide": ([[9 + i] * (2 + i) for i in range(20)], [greedy(3 + i // 5) for i in range(20)], [5, 10, 15, 20])}


@pytest.mark.parametrize("case", CASES)
def test_fused_step_equals_the_per_op_path_bit_for_bit(engine, monkeypatch, case):
    prompts, params, expected_rows = CASES[case]
    if max(expected_rows) > MAX_ROWS:
        pytest.skip(f"the fused step takes at most {MAX_ROWS} rows here (AMX)")
    # the per-op path with the packed GEMM for every product (with AMX oneDNN takes larger products)
    monkeypatch.setattr(onednn_linear, "SKINNY_MAX_ROWS", 1 << 30)
    monkeypatch.setattr(onednn_linear, "WIDE_MAX_ROWS", 1 << 30)
    per_op_logits, fused_logits = both_paths(engine, monkeypatch, prompts, params, expected_rows)
    assert all(torch.equal(a, b) for a, b in zip(fused_logits, per_op_logits, strict=True))


def both_paths(engine, monkeypatch, prompts, params, expected_rows) -> tuple[list, list]:
    """Runs the prompts on the per-op path, then on the fused step; checks that both gave the same greedy tokens,
    that the fused step ran steps of exactly `expected_rows` rows and that both computed as many logits; returns
    each path's logits, step by step."""
    model = engine.runner.model
    fused = model.decode_step
    assert fused is not None
    logits, fused_rows = [], []
    compute_logits, run = model.compute_logits, fused.run
    monkeypatch.setattr(model, "compute_logits",
                        lambda *args: logits.append(compute_logits(*args).clone()) or logits[-1])
    monkeypatch.setattr(fused, "run", lambda batch, *args: fused_rows.append(batch.num_tokens) or run(batch, *args))
    runs = []
    for decode_step in (None, fused):
        monkeypatch.setattr(model, "decode_step", decode_step)
        logits.clear()
        runs.append((run_all(engine, prompts, params), list(logits)))
    (per_op_tokens, per_op_logits), (fused_tokens, fused_logits) = runs
    assert sorted(set(fused_rows)) == expected_rows
    assert fused_tokens == per_op_tokens
    assert len(fused_logits) == len(per_op_logits)
    return per_op_logits, fused_logits


def test_fused_step_takes_only_pure_decode_steps_and_checks_rows(engine):
    model = engine.runner.model
    caches = engine.kv.layer_caches()
    layers = range(CONFIG["num_hidden_layers"])

    def batch(rows: int, prefill: bool = False, position: int = 3) -> ForwardBatch:
        ids = torch.full((rows,), 7, dtype=torch.int64)
        slots = torch.arange(rows)
        return ForwardBatch(ids, torch.full((rows,), position), slots, rows - int(prefill), slots,
                            torch.full((rows,), position + 1), True, position + 1, (), slots)

    assert model.decode_step.takes(batch(MAX_ROWS), caches, layers, None)
    assert not model.decode_step.takes(batch(MAX_ROWS + 1), caches, layers, None)
    assert not model.decode_step.takes(batch(2, prefill=True), caches, layers, None)
    assert not model.decode_step.takes(batch(2), caches, range(1), None)  # a pipeline stage
    assert not model.decode_step.takes(batch(2), caches, layers, object())  # layer-wise KV offload
    buffers = model.buffer_plan(1, 1).carve(torch.zeros(model.buffer_plan(1, 1).num_bytes, dtype=torch.uint8))
    with pytest.raises(IndexError, match="outside the cache"):
        model.decode_step.run(batch(1, position=caches[0][0].shape[1]), caches, buffers)
