"""The offline benchmark in a tiny mode: every table and JSON field is there (speeds are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from loadtest.offline import bench as offline
from loadtest.offline import peer as offline_peer
from loadtest.offline import tables
from loadtest.peers.vllm_cpu import OFFLINE_CHILD, find_peer_dir


def test_table_and_speedup_direction():
    assert tables.speedup("output_tok_s", 200.0, 100.0) == 2.0
    assert tables.speedup("mean_step_ms", 10.0, 30.0) == 3.0  # lower is better: 3x faster
    assert tables.speedup("num_steps", 1, 2) is None
    table = tables.comparison_table({"ours": {"output_tok_s": 50.0, "wall_s": 2.0},
                                     "HF": {"output_tok_s": 25.0, "wall_s": 4.0}}, ("output_tok_s", "wall_s", "x"))
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "ours", "HF", "ours", "vs", "HF"]
    assert lines[2].split()[-1] == "2.00x" and lines[3].split()[-1] == "2.00x"
    assert len(lines) == 4  # the row with no values is left out


def test_missing_peer_is_skipped_with_instructions(tmp_path, capsys):
    args = SimpleNamespace(peer_dir=str(tmp_path / "nothing-here"), peer_dtype=None, dtype="auto", output_len=4,
                           threads=1, num_prompts=1)
    assert find_peer_dir(str(tmp_path / "nothing-here")) is None
    assert offline_peer.start_vllm(args, 8) is None
    assert "make peer" in capsys.readouterr().err


def test_peer_child_imports_only_the_standard_library():
    """The child runs in vLLM's venv, where this repository's packages do not exist."""
    code = ("import sys; sys.modules['torch'] = None; sys.modules['engine'] = None; sys.modules['loadtest'] = None; "
            f"import runpy; runpy.run_path({str(OFFLINE_CHILD)!r}, run_name='not_main')")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("offline") / "offline.json"
    argv = ["--mode", "all", "--num-prompts", "2", "--prompt-len", "8", "--output-len", "8", "--threads", "1",
            "--max-num-seqs", "8", "--max-num-batched-tokens", "128", "--budget-gib", "0.53", "--dtype", "float32",
            "--capacity-prompt-len", "64", "--capacity-output-len", "8", "--json", str(out)]
    return offline.main(argv), json.loads(out.read_text())


@pytest.mark.slow  # with test_tiny_run_numbers: the tiny run's 18 s
def test_tiny_run_prints_every_table(tiny_run, capsys):
    results, _ = tiny_run
    printed = offline.format_results(results)
    for label in ("== throughput: 2 prompts x 8 in / 8 out", "output tok/s", "prefill tok/s", "mean step ms",
                  "mean decode step ms", "ours vs HF", "peak KV", "preemptions", "== batch1", "TPOT ms",
                  "== capacity: 64-token prompts + 8 out", "predicted capacity", "decoding at once", "elastic/static",
                  "activations reserved at start", "engine.peak_activation_bytes", "accounting at other budgets",
                  "load avg", "OMP_WAIT_POLICY"):
        assert label in printed, label


@pytest.mark.slow
def test_tiny_run_numbers(tiny_run):
    results, written = tiny_run
    assert written["throughput"]["ours"]["output_tok_s"] == pytest.approx(results["throughput"]["ours"]["output_tok_s"])
    throughput = written["throughput"]
    ours, hf = throughput["ours"], throughput["HF"]
    assert ours["num_prefill_tokens"] == 16 and ours["num_preemptions"] == 0 and ours["peak_running"] == 2
    assert ours["output_tok_s"] > 0 and ours["prefill_tok_s"] > 0 and ours["mean_decode_step_ms"] > 0
    assert ours["peak_kv_bytes"] > 0 and 0 < ours["peak_kv_budget_pct"] < 100
    assert hf["output_tok_s"] > 0 and hf["compared"] == 2
    batch1 = written["batch1"]
    assert batch1["ours"]["tpot_ms"] > 0 and batch1["HF"]["tpot_ms"] > 0
    capacity = written["capacity"]
    elastic, static = capacity["policies"]["elastic"], capacity["policies"]["static"]
    assert elastic["activation_reserved_bytes"] == 0 and static["activation_reserved_bytes"] > 0
    assert elastic["predicted"] >= static["predicted"] >= 1
    for entry in (elastic, static):
        assert entry["num_preemptions"] == 0 and 1 <= entry["observed"] <= entry["admitted"] <= entry["predicted"] + 1
        assert entry["peak_activation_held_bytes"] > 0
    assert capacity["predicted_ratio"] == elastic["predicted"] / static["predicted"]
    assert elastic["sweep"]["1"] >= static["sweep"]["1"] >= 1  # pure accounting at a budget not run


@pytest.mark.slow
def test_tiny_mixed_run_compares_four_configurations(capsys, tmp_path):
    plot = tmp_path / "memory.png"
    argv = ["--plot", str(plot), "--mode", "mixed", "--mixed-short", "3",
            "--prompt-len", "16", "--output-len", "4", "--mixed-long", "2",
            "--capacity-prompt-len", "96", "--mixed-long-output-len", "2", "--mixed-gap", "2", "--threads", "1",
            "--max-num-seqs", "8", "--max-num-batched-tokens", "32", "--max-prefill-chunk-tokens", "128",
            "--budget-gib", "0.6", "--dtype", "float32"]
    configs = offline.main(argv)["mixed"]["configs"]
    assert list(configs) == ["elastic fixed", "elastic adaptive", "static fixed", "static ceiling"]
    assert set(configs["elastic fixed"]["chunk_budgets"]) == {32} == set(configs["static fixed"]["chunk_budgets"])
    assert set(configs["static ceiling"]["chunk_budgets"]) == {128}
    assert max(configs["elastic adaptive"]["chunk_budgets"]) == 128  # room enough at 0.6 GiB: the chunk swells
    assert configs["elastic fixed"]["activation_reserved_bytes"] == 0
    reserved = [configs[name]["activation_reserved_bytes"] for name in ("static fixed", "static ceiling")]
    assert 0 < reserved[0] < reserved[1]
    for entry in configs.values():
        assert entry["long_ttft_p50_ms"] > 0 and entry["decode_tok_s"] > 0 and entry["num_preemptions"] == 0
    assert "step budgets chosen" in capsys.readouterr().out
    # the balloons after every step: activations swell with the adaptive chunks, and the plot is drawn
    for entry in configs.values():
        assert len(entry["timeline"]) == entry["num_steps"]
    def peak(name, client):
        return max(point["chunks"].get(client, 0) for point in configs[name]["timeline"])
    assert peak("elastic adaptive", "activations") > peak("elastic fixed", "activations")
    assert plot.stat().st_size > 10_000
