"""The fused fp32 decode step (engine/model/decode_step.py, csrc/decode_step_f32.c) gives the per-op path's
greedy tokens and logits within fp32 rounding, on a random model with the shapes that take its other branches
(sliding windows, an intermediate size that is not a whole number of product units)."""

from __future__ import annotations

import pytest
import torch

from engine.model.decode_step import MAX_ROWS, F32DecodeStep
from engine.model.linear import NativeLinear

# the row checks test is collected here too, with this module's fp32 `engine` (the bf16 step's checks)
from tests.engine.model.test_decode_step import (
    CASES,
    _engine,
    both_paths,
    test_fused_step_takes_only_pure_decode_steps_and_checks_rows,  # noqa: F401
)

pytestmark = pytest.mark.skipif(not torch.backends.cpu.get_cpu_capability().startswith(("AVX2", "AVX512")),
                                reason="needs AVX2")


@pytest.fixture(scope="module", params=["llama", "mistral", "llama-240"])
def engine(request, tmp_path_factory):
    engine = _engine(tmp_path_factory.mktemp("decode-step-f32") / request.param, request.param, dtype="float32")
    yield engine
    engine.close()


@pytest.mark.parametrize("case", CASES)
def test_fused_fp32_step_gives_the_per_op_paths_tokens_and_logits(engine, monkeypatch, case):
    prompts, params, expected_rows = CASES[case]
    assert isinstance(engine.runner.model.decode_step, F32DecodeStep)
    per_op_logits, fused_logits = both_paths(engine, monkeypatch, prompts, params, expected_rows)
    for a, b in zip(fused_logits, per_op_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_fp32_step_needs_the_weights_in_panels(tmp_path):
    """Plain weights (`linear_backend: torch`, or a model placed some other way) keep the per-op path."""
    engine = _engine(tmp_path, "llama", dtype="float32")
    try:
        model = engine.runner.model
        # fp32 products are NativeLinear's: the backend itself (AVX2) or oneDNN's fallback for them (AVX512-BF16)
        assert isinstance(getattr(model.linear, "fallback", model.linear), NativeLinear)
        assert F32DecodeStep.accepts(model)
        model.layers[1]["down"] = model.layers[1]["down"].unpack()
        assert not F32DecodeStep.accepts(model)
        assert MAX_ROWS >= 64  # every decode batch the engine makes by default
    finally:
        engine.close()
