"""loadtest/bench/serve.py: level arithmetic and the ratio table without servers; --running on the fake server."""

from __future__ import annotations

import pytest

from loadtest.bench import serve
from loadtest.bench.serve import Level, parse_args, ratio_table
from loadtest.metrics import RequestRecord


def record(start: float, ttft: float, e2e: float, tokens: int, error: str | None = None) -> RequestRecord:
    return RequestRecord("r", "completions", start, e2e, ttft, (ttft,), 128, tokens, tokens, True, error)


def test_level_counts_ok_tokens_over_the_window_and_takes_latencies_from_ok_requests():
    records = [record(100.0, 0.1, 1.37, 128), record(100.5, 0.3, 1.57, 128), record(101.0, None, 0.5, 0, "HTTP 503")]
    level = Level.of(8, records, "1.0 -> 2.0")
    assert level.output_tok_s == pytest.approx(256 / 2.07, rel=1e-12)  # from the first start to the last end
    assert (level.ttft_p50_ms, level.ttft_p99_ms) == (200.0, 298.0)
    assert round(level.tpot_mean_ms, 6) == 10.0  # (1.37 - 0.1) / 127 and (1.57 - 0.3) / 127
    assert (level.num_requests, level.num_errors) == (3, 1)
    # each request in send order, from the first send: a burst's waves show in them
    assert level.requests == ((0.0, 0.1, 128, ""), (0.5, 0.3, 128, ""), (1.0, None, 0, "HTTP 503"))


def test_ratio_table_puts_ours_over_the_peer_for_rates_and_the_peer_over_ours_for_times():
    ours = [Level(1, 80.0, 50.0, 60.0, 12.0, 3, 0, "a")]
    peer = [Level(1, 40.0, 100.0, 120.0, 24.0, 3, 0, "b")]
    row = ratio_table(ours, peer).splitlines()[2]
    assert row.split("|")[1:4] == [" 1 ", " 80.0 / 40.0 ", " 2.00x "]
    assert " 2.00x " in row.split("|")[6] and " 2.00x " in row.split("|")[8]


def test_defaults_are_the_issue_s_levels():
    args = parse_args([])
    assert args.concurrency == [1, 8, 32] and args.config == "serve_config.yaml"


def test_running_measures_the_server_at_the_url_and_starts_none(openai_server, capsys, monkeypatch):
    def no_server(*args, **kwargs):
        raise AssertionError("--running must not start a server")

    monkeypatch.setattr(serve, "run_server", no_server)
    serve.main(["--running", "--ours-url", openai_server, "--concurrency", "2", "--requests-per-user", "1",
                "--output-tokens", "4"])
    table = capsys.readouterr().out
    assert "ours: healthy" in table and "\n| 2 | " in table


def test_the_ttft_split_comes_from_either_servers_histograms_over_the_level():
    from loadtest.bench.serve import split_means_ms, split_table, split_totals

    page = """# HELP elastic:request_queue_time_seconds x
elastic:request_queue_time_seconds_sum{model_name="m",replica="a"} 1.0
elastic:request_queue_time_seconds_count{model_name="m",replica="a"} 4.0
elastic:request_queue_time_seconds_bucket{le="0.5",model_name="m",replica="a"} 4.0
vllm:request_prefill_time_seconds_sum{engine="0"} 2.0
vllm:request_prefill_time_seconds_count{engine="0"} 4.0
elastic:time_to_first_token_seconds_sum{model_name="m",replica="a"} 9.0
"""
    before = split_totals(page)
    assert before == {"request_queue_time_seconds_sum": 1.0, "request_queue_time_seconds_count": 4.0,
                      "request_prefill_time_seconds_sum": 2.0, "request_prefill_time_seconds_count": 4.0}
    after = {**before, "request_queue_time_seconds_sum": 1.5, "request_queue_time_seconds_count": 6.0}
    assert split_means_ms(before, after) == (250.0, None)  # 0.5 s over 2 requests; no prefill observed
    assert split_means_ms({}, {}) == (None, None)  # a server without the histograms
    levels = {"ours": [Level(1, 1.0, 1.0, 1.0, 1.0, 1, 0, "", queue_mean_ms=0.5, prefill_mean_ms=230.0)],
              "vllm": [Level(1, 1.0, 1.0, 1.0, 1.0, 1, 0, "")]}
    assert split_table(levels).splitlines()[2] == "| 1 | 0 + 230 | - |"
