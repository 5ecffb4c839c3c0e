"""`python -m loadtest.bench.prefill_attention` runs both of its comparisons and prints their ratios."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.attention import native


@pytest.mark.skipif(native.load_prefill_kernel() is None, reason="the prefill kernel needs AVX512-BF16")
def test_the_bench_prints_the_layer_and_the_step_ratios():
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.prefill_attention", "--prompts", "2", "--prompt-len", "24",
         "--repeats", "1", "--steps", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("one layer, 2 x 24 tokens") and line.endswith("x") for line in lines), result.stdout
    assert any(line.startswith("prefill step, 2 x 24 tokens") and "kernel" in line for line in lines), result.stdout
