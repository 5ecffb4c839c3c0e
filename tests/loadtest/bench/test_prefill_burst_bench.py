"""loadtest.bench.prefill_burst: every burst round ends at each prompt's first token, the products are timed."""

from __future__ import annotations

import re

from loadtest.bench.prefill_burst import main
from tests.engine.reference import make_tiny_random_checkpoint


def test_bursts_and_products_are_reported(tmp_path, capsys):
    model = make_tiny_random_checkpoint(tmp_path / "tiny-qwen3", arch="qwen3")
    main(["--model", str(model), "--dtype", "float32", "--threads", "1", "--memory-gib", "0.25", "--prompts", "3",
          "--prompt-len", "20", "--rounds", "2", "--max-num-batched-tokens", "32"])
    out = capsys.readouterr().out
    rounds = re.findall(r"round \d: steps ([\d +]+) ms = (\d+) ms", out)
    assert len(rounds) == 2
    for steps, total in rounds:  # 3 x 20 prompt tokens in chunks of at most 32: 2 steps
        assert len(steps.split(" + ")) == 2 and abs(sum(int(t) for t in steps.split(" + ")) - int(total)) <= 2
    kinds = re.findall(r"\| (qkv|o|gate_up|down) \| (\d+) x (\d+) \| \d+ \| \d+ \|", out)
    assert [kind for kind, _, _ in kinds] == ["qkv", "o", "gate_up", "down"]
    assert re.search(r"all products \d+ ms = \d+% of a burst's full step", out)
