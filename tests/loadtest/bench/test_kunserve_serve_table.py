"""The spike bench's own numbers: TTFT of the requests sent during the spike (the middle third of the run) and
how long after the spike's first request the first drop was ordered."""

from __future__ import annotations

from loadtest.bench.kunserve_serve import spike_row, spike_window


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
