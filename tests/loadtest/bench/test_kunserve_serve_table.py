"""The spike bench's own numbers: TTFT of the requests sent during the spike (the middle third of the run) and
how long after the spike's first request the first drop was ordered."""

from __future__ import annotations

from loadtest.bench.kunserve_serve import rounds_table, spike_row, spike_window


def request(sent_at: float, ttft_s: float | None) -> dict:
    return {"start_time": 1000.0 + sent_at, "ttft_s": ttft_s}


def test_only_requests_sent_during_the_spike_count():
    records = [request(0.0, 9.0), request(29.9, 8.0), request(30.5, 2.0), request(31.0, 4.0), request(45.0, 1.0),
               request(50.0, None), request(60.0, 7.0)]  # a 90 s run: the spike is [30, 60)
    orders = [{"action": "drop", "time": 1031.7}, {"action": "grow", "time": 1031.0},
              {"action": "drop", "time": 1000.0}]
    spike = spike_window(records, 90.0, orders)
    assert spike["num_requests"] == 3 and spike["worst_s"] == 4.0 and spike["p50_s"] == 2.0
    assert abs(spike["first_drop_after_s"] - 1.2) < 1e-9  # from the spike's first request (30.5), drops only
    assert spike_row("dropping", spike) == "| dropping | 3 | 2.00 | 4.00 | 4.00 | 1.20 |"


def test_a_run_without_drops_or_spike_requests_still_prints():
    assert spike_window([request(0.0, 1.0), request(31.0, 3.0)], 90.0)["first_drop_after_s"] is None
    assert spike_row("none", spike_window([request(0.0, 1.0)], 90.0)) == "| none | 0 | — | — | — | — |"


def summary(p99_s: float | None, tpot_ms: float) -> dict:
    return {"spike": {"num_requests": 0} if p99_s is None else {"p99_s": p99_s}, "tpot_ms": {"mean": tpot_ms}}


def test_rounds_table_gives_each_mode_its_rounds_the_baseline_s_ratio_over_it_and_the_medians():
    rounds = [{"none": summary(12.0, 30.0), "dropping": summary(1.2, 45.0)},
              {"none": summary(6.0, 30.0), "dropping": summary(1.0, 60.0)},
              {"none": summary(20.0, 40.0), "dropping": summary(None, 60.0)}]  # no spike request finished
    lines = rounds_table(rounds).splitlines()
    assert lines[2] == "| none | 12.00, 6.00, 20.00 | 12.00 | 1.0, 1.0, 1.0 | 1.00 | 30, 30, 40 | 1.00 |"
    # ratios 10 and 6 (the third round has none), TPOT ratios 1.5, 2.0, 1.5
    assert lines[3] == "| dropping | 1.20, 1.00, — | 1.10 | 10.0, 6.0, — | 8.00 | 45, 60, 60 | 1.50 |"
