from __future__ import annotations

import json

import pytest

from loadtest.metrics import (
    LatencyStats,
    RequestRecord,
    Slo,
    Summary,
    percentile,
    read_records,
    summarize,
    time_series,
)


def record(start, ttft, token_times, e2e, num_output, error=None, num_prompt=10, requested=None):
    return RequestRecord(
        request_id=f"r{start}",
        endpoint="completions",
        start_time=start,
        e2e_s=e2e,
        ttft_s=ttft,
        token_times_s=tuple(token_times),
        num_prompt_tokens=num_prompt,
        num_output_tokens=num_output,
        num_requested_output_tokens=num_output if requested is None else requested,
        is_usage_reported=True,
        error=error,
    )


# Times are multiples of 1/8 s so that every number below is exact in binary floating point.
A = record(100.0, 0.25, [0.25, 0.375, 0.5, 0.75], 0.75, 4)  # TPOT (0.75-0.25)/3; ITL .125 .125 .25
B = record(100.5, 0.5, [0.5, 1.0], 1.5, 3)  # two chunks for three tokens: TPOT (1.5-0.5)/2 = 0.5
C = record(101.0, 0.125, [0.125], 0.125, 1)  # one token: no TPOT, no ITL
D = record(101.5, None, [], 0.5, 0, error="HTTP 500: boom", num_prompt=None)


def test_percentile_matches_numpy_linear():
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([0.0, 10.0], 25) == 2.5
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_record_derived_latencies():
    assert A.itl_s == (0.125, 0.125, 0.25)
    assert A.tpot_s == pytest.approx(0.5 / 3)
    assert B.tpot_s == 0.5
    assert C.tpot_s is None and C.itl_s == ()
    assert D.tpot_s is None and not D.is_ok
    assert A.end_time == 100.75


def test_record_json_round_trip(tmp_path):
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(r.to_json() for r in (A, B, C, D)) + "\n\n")
    assert read_records(path) == [A, B, C, D]
    extra = json.loads(A.to_json()) | {"unknown_future_field": 1}
    assert RequestRecord.from_dict(extra) == A


def test_latency_stats_in_milliseconds():
    stats = LatencyStats.of_seconds([0.25, 0.5, 0.125])
    assert stats == LatencyStats(count=3, mean=875.0 / 3, p50=250.0, p90=450.0, p99=495.0, max=500.0)
    assert LatencyStats.of_seconds([]) == LatencyStats(count=0)


def test_summary_exact_numbers():
    summary = summarize([A, B, C, D], label="x", scenario="unit")
    # window: first start 100.0 -> last end max(100.75, 102.0, 101.125, 102.0) = 102.0
    assert summary.window_s == 2.0
    assert (summary.num_requests, summary.num_ok, summary.num_errors) == (4, 3, 1)
    assert summary.error_rate == 0.25
    assert summary.requests_per_s == 1.5
    assert summary.output_tokens_per_s == 4.0  # (4 + 3 + 1) / 2
    assert summary.prompt_tokens_per_s == 15.0
    assert summary.mean_output_tokens == 8 / 3
    assert summary.mean_prompt_tokens == 10.0
    assert summary.ttft_ms == LatencyStats.of_seconds([0.25, 0.5, 0.125])
    assert summary.tpot_ms.count == 2
    assert summary.tpot_ms.p50 == pytest.approx((500.0 / 3 + 500.0) / 2)
    assert summary.itl_ms == LatencyStats.of_seconds([0.125, 0.125, 0.25, 0.5])
    assert summary.e2e_ms == LatencyStats.of_seconds([0.75, 1.5, 0.125])
    assert summary.errors == {"HTTP 500: boom": 1}
    assert summary.slo_attainment == 0.75  # no limits: every ok request meets them; the error does not
    assert summary.goodput_requests_per_s == 1.5


def test_slo_attainment_and_goodput():
    # TTFT <= 300 ms keeps A (250) and C (125); TPOT <= 200 ms keeps A (166.7) and C (none) -> A and C
    summary = summarize([A, B, C, D], slo=Slo(ttft_ms=300, tpot_ms=200))
    assert summary.slo_attainment == 0.5
    assert summary.goodput_requests_per_s == 1.0
    assert summary.goodput_output_tokens_per_s == 2.5  # (4 + 1) / 2 s
    only_tpot = summarize([A, B, C, D], slo=Slo(tpot_ms=100))  # only C (no TPOT) meets it
    assert only_tpot.slo_attainment == 0.25
    assert Slo(ttft_ms=250).is_met_by(A)  # the limit itself is met
    assert not Slo(ttft_ms=100).is_met_by(record(0.0, None, [], 1.0, 0))  # no token at all misses a TTFT SLO
    with pytest.raises(ValueError):
        Slo(ttft_ms=0)


def test_output_length_mismatch_counts_ok_requests_only():
    short = record(0.0, 0.125, [0.125, 0.25], 0.25, 2, requested=8)
    assert summarize([A, short]).num_output_length_mismatches == 1


def test_empty_run():
    summary = summarize([])
    assert summary.num_requests == 0 and summary.requests_per_s == 0.0 and summary.slo_attainment is None
    assert summary.ttft_ms.count == 0


def test_summary_json_round_trip():
    summary = summarize([A, B, C, D], slo=Slo(ttft_ms=300), label="x", extra={"host": "h"})
    assert Summary.from_dict(json.loads(summary.to_json())) == summary


def test_time_series_buckets():
    buckets = time_series([A, B, C, D], bucket_s=1.0, origin=100.0)
    assert [b.start_s for b in buckets] == [0.0, 1.0]
    first, second = buckets
    # A ends at 100.75 (bucket 0); B at 102.0 and D at 102.0 fall at the end: clamped into the last bucket
    assert (first.num_finished, first.num_errors) == (1, 0)
    assert (second.num_finished, second.num_errors) == (2, 1)
    # tokens by arrival: A's four at 100.25..100.75, B's 3 tokens over 2 chunks at 101.0 and 101.5,
    # C's one at 101.125
    assert first.num_output_tokens == 4.0
    assert second.num_output_tokens == 4.0
    assert first.output_tokens_per_s == 4.0 and second.requests_per_s == 2.0
    assert first.num_in_flight == 1  # A at 100.0
    assert second.num_in_flight == 2  # B (100.5-102.0) and C (101.0-101.125) at 101.0
    assert first.itl_ms == LatencyStats.of_seconds([0.125, 0.125, 0.25])
    assert second.itl_ms == LatencyStats.of_seconds([0.5])
    assert second.ttft_ms == LatencyStats.of_seconds([0.5, 0.125])
    assert time_series([], 1.0) == []
    with pytest.raises(ValueError):
        time_series([A], 0)
