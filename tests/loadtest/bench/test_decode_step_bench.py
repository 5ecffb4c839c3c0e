"""loadtest.bench.decode_step's closed loop: every request runs to its end, and the summary counts every token."""

from __future__ import annotations

import argparse
import re

from loadtest.bench.decode_step import closed_loop
from tests.engine.reference import make_tiny_random_checkpoint


def test_closed_loop_summary_counts_every_token(tmp_path, capsys):
    model = make_tiny_random_checkpoint(tmp_path / "tiny-qwen3", arch="qwen3")
    args = argparse.Namespace(model=str(model), dtype="float32", threads=1, memory_gib=0.25, requests_per_user=2,
                              prompt_len=20, output_len=5, engine_path=True, max_num_batched_tokens=32)
    closed_loop(3, args)
    out = capsys.readouterr().out
    summary = re.search(r"engine path: ([\d.]+) out tok/s \((\d+) tokens in [\d.]+ s\), "
                        r"TTFT p50 (\d+) / p99 (\d+) ms, engine thread CPU / step wall ([\d.]+)", out)
    assert summary is not None, out
    assert float(summary.group(1)) > 0 and int(summary.group(2)) == 3 * 2 * 5
    assert int(summary.group(3)) <= int(summary.group(4))
    # 3 users x 2 requests x 5 tokens, in steps of decode rows and prompt chunks of at most 32 tokens
    shapes = re.findall(r"\| (decode \d+|mixed \d+ \+ \d+) \| (\d+) / (\d+) \|", out)
    assert shapes and all(int(shape.split()[-1]) <= 32 for shape, _, _ in shapes if shape.startswith("mixed"))
    assert "per-op" not in out.split("engine path")[0].splitlines()[-1]
