"""`python -m loadtest.bench.prefill_attention` runs both of its comparisons and prints their ratios."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from engine.attention import native

KERNELS = native.load_prefill_kernels()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_the_bench_prints_the_layer_and_the_step_ratios(dtype):
    if getattr(torch, dtype) not in KERNELS:
        pytest.skip(f"no {dtype} prefill kernel on this CPU")
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.prefill_attention", "--dtype", dtype, "--prompts", "2",
         "--prompt-len", "24", "--repeats", "1", "--steps", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("one layer, 2 x 24 tokens") and line.endswith("x") for line in lines), result.stdout
    assert any(line.startswith("prefill step, 2 x 24 tokens") and "kernel" in line for line in lines), result.stdout
