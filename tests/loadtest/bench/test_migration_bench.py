"""loadtest.bench.migration without a cluster: the workload, the KV-gap measure and the side-by-side table."""

from __future__ import annotations

from loadtest.bench.migration import ClusterSampler, PolicyResult, SkewedWorkload, format_table
from loadtest.metrics import RequestRecord, summarize


def test_workload_prompts_are_deterministic_and_distinct():
    workload = SkewedWorkload(num_requests=3, prompt_tokens=20)
    assert workload.prompts() == workload.prompts() and len(set(workload.prompts())) == 3


def test_mean_kv_gap_counts_only_busy_samples():
    sampler = ClusterSampler("http://unused")
    busy = {"kv_usage": 0.9, "running": 2, "waiting": 1}
    idle = {"kv_usage": 0.1, "running": 0, "waiting": 0}
    sampler.samples = [{"a": busy, "b": idle}, {"a": dict(busy, kv_usage=0.5), "b": dict(idle, kv_usage=0.3)},
                       {"a": dict(idle, kv_usage=0.0), "b": idle}]
    assert abs(sampler.mean_kv_gap() - 0.5) < 1e-9  # (0.8 + 0.2) / 2; the idle sample is left out


def result(policy, preemptions, committed):
    record = RequestRecord("r", "completions", 0.0, 2.0, 0.5, (0.5, 1.0, 1.5), 10, 3, 3, True)
    migrations = {"committed": committed, "aborted": 0, "copy": committed, "recompute": 0,
                  "bytes_moved": committed * 2**20}
    return PolicyResult(policy, summarize([record]), {"a": preemptions, "b": 0}, "a", migrations,
                        250.0 if committed else None, 0.4, {"a": 0.9, "b": 0.2}, 5e8 if committed else 0.0)


def test_table_puts_policies_side_by_side():
    table = format_table([result("none", 7, 0), result("balance", 2, 3)])
    lines = table.splitlines()
    assert lines[0].split() == ["none", "balance"]
    assert "preemptions (loaded / other)" in table and lines[2].split()[-6:] == ["7", "/", "0", "2", "/", "0"]
    assert [line for line in lines if line.startswith("mean downtime ms")][0].split()[-2:] == ["-", "250"]
    assert [line for line in lines if line.startswith("KV transfer MB/s")][0].split()[-2:] == ["-", "500"]
