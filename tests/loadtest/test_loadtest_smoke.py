"""End to end: `python -m loadtest.run` and the bare locustfile against a server on 127.0.0.1."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_loadtest(out: Path, host: str, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "loadtest.run", "--host", host, "--out", str(out), "--tokenizer", "words"]
    return subprocess.run(
        [*command, *arguments], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_valid_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, path


@pytest.mark.slow  # 19 s; the Locust path stays in the default suite (the bare locustfile, the one-shot burst)
def test_steady_run_writes_summary_and_plots(openai_server, tmp_path):
    out = tmp_path / "steady"
    result = run_loadtest(
        out, openai_server, "--scenario", "steady-8", "--duration", "15", "--users", "4", "--output-tokens", "32",
        "--slo-ttft", "1000", "--slo-tpot", "100", "--label", "smoke",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_requests"] > 20 and summary["num_errors"] == 0 and summary["error_rate"] == 0
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        for quantile in ("p50", "p90", "p99"):
            assert summary[metric][quantile] > 0, (metric, quantile)
    assert summary["ttft_ms"]["p50"] >= 20  # the fake waits 20 ms before the first token
    assert summary["tpot_ms"]["p50"] >= 4  # and 4 ms between tokens
    assert summary["mean_output_tokens"] == 32 and summary["num_output_length_mismatches"] == 0
    assert summary["mean_prompt_tokens"] == 128  # word counts are the fake's token counts
    assert summary["output_tokens_per_s"] > 0 and summary["requests_per_s"] > 0
    assert summary["slo_attainment"] == 1.0 and summary["goodput_requests_per_s"] == summary["requests_per_s"]
    assert summary["extra"]["has_memory_endpoint"] is True
    assert len((out / "requests.jsonl").read_text().splitlines()) == summary["num_requests"]
    memory_rows = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    assert len(memory_rows) >= 10 and all(row["status"] == 200 for row in memory_rows)
    with open(out / "locust_stats.csv", newline="") as handle:
        kinds = {row["Type"] for row in csv.DictReader(handle)}
    assert {"TTFT", "ITL", "TPOT", "E2E", "POST"} <= kinds
    for name in ("latency.png", "throughput.png", "memory.png"):
        assert_valid_png(out / name)
    assert "TTFT" in result.stdout and "goodput" in result.stdout  # the table at the end

    compared = subprocess.run(
        [sys.executable, "-m", "loadtest.compare", str(out), str(out / "summary.json")],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert compared.returncode == 0 and "1.00x" in compared.stdout


@pytest.mark.slow  # 8 s
def test_open_loop_bursts_of_long_prompts(openai_server, tmp_path):
    out = tmp_path / "burst"
    result = run_loadtest(
        out, openai_server, "--scenario", "long-context", "--duration", "4", "--users", "2", "--output-tokens", "8",
        "--context-tokens", "512",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    burst = [record for record in records if record["pool"] == "burst"]
    assert len(burst) == 12  # bursts of 4 every 4/3 s from 2/3 s on
    assert all(record["error"] is None for record in records)
    assert all(0.75 * 480 - 1 <= record["num_prompt_tokens"] <= 0.95 * 480 for record in burst)
    starts = sorted(record["start_time"] for record in burst)
    assert starts[3] - starts[0] < 0.3 and 1.0 < starts[4] - starts[0] < 1.6  # together, then 4/3 s apart
    assert_valid_png(out / "memory.png")


def test_one_shot_burst_ends_when_every_request_is_answered(openai_server, tmp_path):
    out = tmp_path / "layerkv-burst"
    started = time.monotonic()
    result = run_loadtest(
        out, openai_server, "--scenario", "layerkv-burst", "--duration", "100", "--burst-size", "4",
        "--prompt-tokens", "32", "--output-tokens", "16", "--slo-ttft", "1000", "--slo-tpot", "100",
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(record["error"] is None for record in records)
    assert {record["num_prompt_tokens"] for record in records} == {32}
    assert {record["num_output_tokens"] for record in records} == {16}
    starts = sorted(record["start_time"] for record in records)
    assert starts[-1] - starts[0] < 0.3  # at once
    assert elapsed < 40, elapsed  # it stopped by itself, long before --duration
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_requests"] == 4 and summary["slo_attainment"] == 1.0
    assert summary["window_s"] == max(r["start_time"] + r["e2e_s"] for r in records) - starts[0]  # the makespan
    assert "makespan" in result.stdout


def test_bare_locustfile_runs_headless(openai_server, tmp_path):
    requests_file = tmp_path / "requests.jsonl"
    env = {**os.environ, "LOADTEST_REQUESTS_FILE": str(requests_file)}
    for name in ("LOADTEST_WORKLOAD", "LOADTEST_SHAPE", "LOADTEST_MODEL"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", "loadtest/locustfile.py", "--host", openai_server, "--headless",
         "-u", "2", "-r", "2", "-t", "3s", "--only-summary", "ChatUser"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in requests_file.read_text().splitlines()]
    assert records and all(r["error"] is None and r["endpoint"] == "chat" for r in records)
    assert {r["num_output_tokens"] for r in records} == {128}
