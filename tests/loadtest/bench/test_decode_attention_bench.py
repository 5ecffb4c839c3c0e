"""`python -m loadtest.bench.decode_attention` times the decode kernel and prints one row per case."""

from __future__ import annotations

import subprocess
import sys


def test_the_bench_prints_a_row_per_case():
    result = subprocess.run(
        [sys.executable, "-m", "loadtest.bench.decode_attention", "--batches", "2", "--context", "20", "33",
         "--threads", "1", "--repeats", "2"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| 2 |")]
    assert [row.split("|")[2].strip() for row in rows] == ["20", "33"], result.stdout
    assert all(float(row.split("|")[4]) > 0 for row in rows), result.stdout
