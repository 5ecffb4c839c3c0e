"""Results of one packing-simulation run, and the side-by-side table of several (loadtest/sim/packing.py fills
them in: `Cluster.summary`)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SimResult:
    policy: str
    num_requests: int
    end_s: float  # the last request finished
    replica_hours: float  # every replica from when it was asked for to its release (or end_s)
    peak_replicas: int
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p99_s: float
    num_preemptions: int
    num_copies: int
    num_recomputes: int
    num_aborted: int  # copies abandoned because the request finished or was preempted meanwhile
    num_refused: int  # planned migrations the destination had no room for
    num_fallbacks: int  # copies whose KV no longer fitted at the switch (the request recomputed there)
    bytes_moved: int
    slo_attainment: float  # share of requests meeting both the TTFT and the TPOT target
    wall_s: float = field(default=0.0, compare=False)  # how long the simulation itself took

    def __post_init__(self) -> None:
        if self.replica_hours < 0 or not 0 <= self.slo_attainment <= 1:
            raise ValueError("replica_hours must be >= 0 and slo_attainment in [0, 1]")


_COLUMNS = ("policy", "replica-h", "peak", "TTFT p50", "TTFT p99", "TPOT p99", "preempt", "migr copy/recomp",
            "aborted", "GB moved", "SLO")


def _row(result: SimResult) -> tuple[str, ...]:
    return (result.policy, f"{result.replica_hours:.1f}", str(result.peak_replicas),
            f"{result.ttft_p50_s * 1e3:.0f} ms", f"{result.ttft_p99_s * 1e3:.0f} ms",
            f"{result.tpot_p99_s * 1e3:.1f} ms", str(result.num_preemptions),
            f"{result.num_copies}/{result.num_recomputes}", str(result.num_aborted),
            f"{result.bytes_moved / 1e9:.1f}", f"{result.slo_attainment * 100:.2f}%")


def format_table(results: list[SimResult]) -> str:
    rows = [_COLUMNS] + [_row(result) for result in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width)
                       in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    by_name = {result.policy: result for result in results}
    for baseline in ("none", "drain"):
        packed, base = by_name.get("balance+pack"), by_name.get(baseline)
        if packed and base and base.replica_hours > 0:
            ratio = packed.replica_hours / base.replica_hours
            lines.append(f"balance+pack / {baseline}: replica-hours x{ratio:.3f} ({(1 - ratio) * 100:.1f}% saved)")
    return "\n".join(lines)
