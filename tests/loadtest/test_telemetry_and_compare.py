from __future__ import annotations

import json

from loadtest.compare import format_comparison, main
from loadtest.metrics import RequestRecord, Slo, summarize
from loadtest.telemetry import (
    MemoryPoint,
    TelemetrySampler,
    memory_point,
    metric_total,
    parse_prometheus,
    read_memory_points,
)

PROMETHEUS = """\
# HELP elastic:num_requests_running Requests running.
# TYPE elastic:num_requests_running gauge
elastic:num_requests_running{model_name="m",replica="a"} 3
elastic:num_requests_running{model_name="m",replica="b"} 2.0
vllm:num_requests_waiting{model_name="m"} 7 1700000000000
python_gc_objects_collected_total{generation="0"} 123.0
elastic:kv_cache_usage_perc 0.25
garbage line
elastic:bad_value{x="1"} not-a-number
"""


def test_parse_prometheus_keeps_server_families_only():
    assert parse_prometheus(PROMETHEUS) == {
        'elastic:num_requests_running{model_name="m",replica="a"}': 3.0,
        'elastic:num_requests_running{model_name="m",replica="b"}': 2.0,
        'vllm:num_requests_waiting{model_name="m"}': 7.0,
        "elastic:kv_cache_usage_perc": 0.25,
    }
    assert 'python_gc_objects_collected_total{generation="0"}' in parse_prometheus(PROMETHEUS, prefixes=())


def test_metric_total_sums_labels_across_prefixes():
    values = parse_prometheus(PROMETHEUS)
    assert metric_total(values, "num_requests_running") == 5.0
    assert metric_total(values, "num_requests_waiting") == 7.0  # vLLM's name matches the same suffix
    assert metric_total(values, "num_preemptions_total") is None


MIB = 1024 * 1024


def test_memory_point_sums_ranks_and_converts_chunks_to_bytes():
    rank = {
        "chunk_bytes": 2 * MIB,
        "chunks_per_client": {"kv": 10, "activations": 2, "weights": 5},
        "num_free_chunks": 3,
        "host_buffer_used_bytes": 4 * MIB,
        "policy": "elastic",
    }
    point = memory_point(12.5, {"replica": "r1", "ranks": [rank, rank]})
    assert point == MemoryPoint(
        time=12.5,
        replica="r1",
        num_ranks=2,
        client_bytes={"kv": 40.0 * MIB, "activations": 8.0 * MIB, "weights": 20.0 * MIB},
        free_bytes=12.0 * MIB,
        host_bytes=8.0 * MIB,
    )


def test_memory_point_tolerates_missing_and_odd_keys():
    partial = memory_point(1.0, {"ranks": [{"chunk_bytes": 1024, "chunks_per_client": {"kv": 2, "odd": "x"}}]})
    assert partial.client_bytes == {"kv": 2048.0} and partial.free_bytes is None and partial.host_bytes is None
    assert partial.replica == "replica"
    assert memory_point(1.0, {"ranks": [{"host_buffer_used_bytes": 5}]}).host_bytes == 5.0
    assert memory_point(1.0, {"ranks": [{"chunks_per_client": {"kv": 1}}]}) is None  # no chunk size: no bytes
    assert memory_point(1.0, {"ranks": []}) is None
    assert memory_point(1.0, {"error": {"message": "not found"}}) is None
    assert memory_point(1.0, None) is None
    flat = memory_point(1.0, {"chunk_bytes": 8, "chunks_per_client": {"kv": 1}, "num_free_chunks": 1})
    assert flat.client_bytes == {"kv": 8.0} and flat.free_bytes == 8.0  # a bare telemetry dict, no "ranks"


def test_read_memory_points_skips_404s_and_errors(tmp_path):
    rows = [
        {"time": 1.0, "status": 404, "body": {"detail": "Not Found"}},
        {"time": 2.0, "status": None, "error": "refused"},
        {"time": 3.0, "status": 200, "body": {"replica": "a", "ranks": [{"host_buffer_used_bytes": 1}]}},
    ]
    path = tmp_path / "memory.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows) + '\n{"time": 4, "sta')  # last line cut off
    assert [point.time for point in read_memory_points(path)] == [3.0]


class CannedSession:
    """requests.Session.get with one canned answer per path."""

    def __init__(self, answers: dict[str, tuple[int, object]]):
        self.answers = answers
        self.paths: list[str] = []

    def get(self, url: str, timeout: float):
        path = url.split("127.0.0.1:1", 1)[1]
        self.paths.append(path)
        status, body = self.answers[path]
        return type("Response", (), {"status_code": status, "json": lambda self: body})()


def test_sampler_reads_every_replica_from_the_cluster_view_else_v1_memory(tmp_path):
    pool = {"chunk_bytes": 10, "chunks_per_client": {"kv": 3}, "num_free_chunks": 1}
    cluster = {"replicas": {"a": {"is_stale": False, "pools": [pool]}, "b": {"is_stale": False, "pools": [pool, pool]},
                            "gone": {"is_stale": True, "pools": [pool]}}}
    sampler = TelemetrySampler("http://127.0.0.1:1", tmp_path)
    with open(tmp_path / "memory.jsonl", "w") as out:
        sampler._sample_memory(CannedSession({"/v1/cluster": (200, cluster)}), out)
    points = read_memory_points(tmp_path / "memory.jsonl")
    assert [(p.replica, p.num_ranks, p.client_bytes["kv"]) for p in points] == [("a", 1, 30.0), ("b", 2, 60.0)]

    session = CannedSession({"/v1/cluster": (404, {}), "/v1/memory": (200, {"replica": "x", "ranks": [pool]})})
    with open(tmp_path / "memory.jsonl", "w") as out:
        sampler._sample_memory(session, out)
        sampler._sample_memory(session, out)
    assert session.paths == ["/v1/cluster", "/v1/memory", "/v1/memory"]  # a 404 stops asking for the view
    assert [p.replica for p in read_memory_points(tmp_path / "memory.jsonl")] == ["x", "x"]


def _summary(label: str, ttft_s: float, e2e_s: float) -> object:
    record = RequestRecord("r", "completions", 0.0, e2e_s, ttft_s, (ttft_s, e2e_s), 8, 2, 2, True)
    return summarize([record], slo=Slo(ttft_ms=100), label=label, scenario="steady-8")


def test_comparison_ratios_and_winner():
    a = _summary("static", ttft_s=0.2, e2e_s=1.0)
    b = _summary("elastic", ttft_s=0.1, e2e_s=0.5)
    table = format_comparison(a, b)
    ttft_line = next(line for line in table.splitlines() if line.startswith("TTFT p50"))
    assert ttft_line.split() == ["TTFT", "p50", "(ms)", "200.0", "100.0", "0.50x", "elastic"]
    throughput = next(line for line in table.splitlines() if line.startswith("output tokens/s"))
    assert throughput.split()[-2:] == ["2.00x", "elastic"]  # 2 tokens in 0.5 s vs in 1 s: higher is better
    attainment = next(line for line in table.splitlines() if line.startswith("SLO attainment"))
    assert attainment.split()[2:] == ["0.000", "1.000", "elastic"]  # A misses (200 > 100 ms): no ratio
    assert "warning" not in table


def test_compare_cli_reads_folders_and_warns_on_different_scenarios(tmp_path, capsys):
    a = _summary("a", 0.2, 1.0)
    b = summarize([], label="b", scenario="poisson")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "summary.json").write_text(a.to_json())
    (tmp_path / "b.json").write_text(b.to_json())
    assert main([str(tmp_path / "a"), str(tmp_path / "b.json")]) == 0
    output = capsys.readouterr().out
    assert "warning: scenarios differ: steady-8 vs poisson" in output
    assert main([str(tmp_path / "a"), str(tmp_path / "missing")]) == 2
