"""Results of a simulated run and the tables the experiments print (every title says SIMULATED)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadtest.sim.cluster import Cluster


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    tpot_s: float = 0.1

    @classmethod
    def parse(cls, text: str) -> Slo:
        """'ttft=2,tpot=0.1' (seconds; suffix ms allowed: 'tpot=100ms')."""
        values = {}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            value = value.strip()
            values[key.strip()] = float(value[:-2]) / 1e3 if value.endswith("ms") else float(value.rstrip("s"))
        unknown = set(values) - {"ttft", "tpot"}
        if unknown:
            raise ValueError(f"unknown SLO keys {sorted(unknown)}: use ttft=...,tpot=...")
        return cls(values.get("ttft", cls.ttft_s), values.get("tpot", cls.tpot_s))


@dataclass(frozen=True)
class RunResult:
    label: str
    num_requests: int
    hours: float  # from the first arrival to the last finish
    gpu_hours: float
    peak_gpus: int
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    num_preemptions: int
    num_copies: int
    num_recomputes: int
    num_aborted: int
    num_refused: int
    bytes_moved: int
    wall_s: float = 0.0

    @property
    def mean_gpus(self) -> float:
        return self.gpu_hours / self.hours if self.hours else 0.0

    @property
    def migrations_per_hour(self) -> float:
        return (self.num_copies + self.num_recomputes) / self.hours if self.hours else 0.0

    def attainment(self, slo: Slo) -> float:
        return float(((self.ttft_s <= slo.ttft_s) & (self.tpot_s <= slo.tpot_s)).mean()) if len(self.ttft_s) else 1.0


def summarize(cluster: Cluster, label: str, wall_s: float = 0.0) -> RunResult:
    records = cluster.records
    if any(record.num_finishes != 1 for record in records):
        raise AssertionError("a request finished other than exactly once")
    ttft = np.array([record.first_token_s - record.trace.arrival_s for record in records])
    tpot = np.array([(record.finish_s - record.first_token_s) / (record.trace.output_tokens - 1)
                     if record.trace.output_tokens > 1 else 0.0 for record in records])
    counts = cluster.counts
    return RunResult(label, len(records), cluster.now / 3600, cluster.replica_seconds / 3600, cluster.peak_replicas,
                     ttft, tpot, sum(r.engine.scheduler.num_preemptions for r in cluster.replicas), counts["copies"],
                     counts["recomputes"], counts["aborted"], counts["refused"], counts["bytes_moved"], wall_s)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [list(map(str, header))] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(cells[0]))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
              for row in cells[1:]]
    return "\n".join(lines)


def percentile_ms(values: np.ndarray, q: float) -> str:
    return f"{np.percentile(values, q) * 1e3:.0f} ms" if len(values) else "-"
