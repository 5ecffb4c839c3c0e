"""memory.bench runs end to end (its numbers are printed, never asserted)."""

from __future__ import annotations

from memory import bench


def test_bench_measures_every_operation_for_every_backend_and_size():
    latencies, throughputs, skipped = bench.run(["host", "sim", "cuda"], {48 << 10: 8, 2 << 20: 2}, rounds=1)
    assert [(row.backend, row.chunk_bytes) for row in latencies[::6]] == [
        ("host", 48 << 10), ("host", 2 << 20), ("sim", 48 << 10), ("sim", 2 << 20)] + (
        [("cuda", 2 << 20)] if not any(line.startswith("cuda:") for line in skipped) else [])
    operations = ["create", "map", "map run", "move", "unmap", "release"]
    assert [row.operation for row in latencies[:6]] == operations
    assert len(throughputs) == 4 * len(latencies) // 6
    assert all(row.chunks_per_second > 0 for row in throughputs)
    table = bench.format_tables(latencies, throughputs)
    assert "median µs" in table and "GB/s" in table and "48 KiB" in table
