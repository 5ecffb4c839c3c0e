"""loadtest/bench/served_tpot.py: the table's ratios and median row; the engine-alone side on the real engine."""

from __future__ import annotations

import pytest

from loadtest.bench.served_tpot import Round, engine_tpot_ms, table


def test_table_gives_each_round_its_ratios_and_a_median_row():
    rows = table([Round(30.0, 33.0, 36.0), Round(28.0, 40.0, 35.0), Round(26.0, 30.0, 31.0)]).splitlines()
    assert rows[2] == "| 1 | 30.0 | 33.0 | 36.0 | 1.20x | 1.10x |"
    assert rows[-1] == "| median | 28.0 | 33.0 | 35.0 | 1.25x | 1.18x |"  # medians per column, then their ratios
    assert "median" not in table([Round(30.0, 33.0, 36.0)])


def test_engine_alone_runs_the_yamls_engine_and_times_its_tokens(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text("applications:\n  - name: x\n    import_path: deployments.app:build_app\n"
                      "    args: {dtype: float32, device_memory: 768MiB, max_model_len: 256, num_threads: 1}\n")
    tpot = engine_tpot_ms(str(config), ["Tell me about the sea."], num_requests=1, output_tokens=6)
    assert 0 < tpot < 5_000
    other = tmp_path / "other.yaml"
    other.write_text("applications: [{name: y, import_path: other:app}]\n")
    with pytest.raises(ValueError, match="no application"):
        engine_tpot_ms(str(other), ["x"], 1, 2)
