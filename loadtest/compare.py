"""Two runs side by side: `python -m loadtest.compare RESULT_A RESULT_B` (results folders or summary.json).

Prints each metric for A and B and the ratio B/A, marking which side is better (latency: lower; throughput
and attainment: higher). Warns when the runs differ in scenario or settings, since a ratio between
different tests means little.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loadtest.metrics import Summary


@dataclass(frozen=True)
class Row:
    name: str
    pick: Callable[[Summary], float | None]
    is_higher_better: bool


def _latency(metric: str, quantile: str) -> Row:
    return Row(f"{metric.upper()} {quantile} (ms)", lambda s: getattr(getattr(s, f"{metric}_ms"), quantile), False)


ROWS: tuple[Row, ...] = (
    Row("requests", lambda s: s.num_requests, True),
    Row("errors", lambda s: s.num_errors, False),
    Row("requests/s", lambda s: s.requests_per_s, True),
    Row("output tokens/s", lambda s: s.output_tokens_per_s, True),
    *(_latency("ttft", q) for q in ("p50", "p90", "p99")),
    *(_latency("tpot", q) for q in ("p50", "p90", "p99")),
    *(_latency("itl", q) for q in ("p50", "p99")),
    *(_latency("e2e", q) for q in ("p50", "p99")),
    Row("SLO attainment", lambda s: s.slo_attainment, True),
    Row("goodput requests/s", lambda s: s.goodput_requests_per_s, True),
    Row("goodput tokens/s", lambda s: s.goodput_output_tokens_per_s, True),
)


def load_summary(path: str | Path) -> Summary:
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    return Summary.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _format(value: float | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"


def differences(a: Summary, b: Summary) -> list[str]:
    notes = []
    if a.scenario != b.scenario:
        notes.append(f"scenarios differ: {a.scenario} vs {b.scenario}")
    for key in ("settings", "shape_params", "user_classes"):
        if a.extra.get(key) != b.extra.get(key):
            notes.append(f"{key} differ: {a.extra.get(key)} vs {b.extra.get(key)}")
    if (a.slo.ttft_ms, a.slo.tpot_ms) != (b.slo.ttft_ms, b.slo.tpot_ms):
        notes.append(f"SLOs differ: {a.slo} vs {b.slo}")
    return notes


def format_comparison(a: Summary, b: Summary) -> str:
    name_a = a.label or "A"
    name_b = b.label or "B"
    if name_a == name_b:
        name_a, name_b = f"A:{name_a}", f"B:{name_b}"
    width = max(14, len(name_a) + 2, len(name_b) + 2)
    lines = [f"{'metric':<22}{name_a:>{width}}{name_b:>{width}}{'B/A':>9}  better"]
    for row in ROWS:
        value_a, value_b = row.pick(a), row.pick(b)
        ratio = better = ""
        if value_a is not None and value_b is not None:
            if value_a:
                ratio = f"{value_b / value_a:.2f}x"
            if value_a != value_b:
                is_b_higher = value_b > value_a
                better = name_b if is_b_higher == row.is_higher_better else name_a
        lines.append(f"{row.name:<22}{_format(value_a):>{width}}{_format(value_b):>{width}}{ratio:>9}  {better}")
    slo = a.slo
    lines.append(f"SLO: TTFT <= {slo.ttft_ms} ms, TPOT <= {slo.tpot_ms} ms; scenario {a.scenario}")
    lines.extend(f"warning: {note}" for note in differences(a, b))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.compare", description=__doc__.splitlines()[0])
    parser.add_argument("result_a", help="results folder or summary.json (the baseline)")
    parser.add_argument("result_b", help="results folder or summary.json")
    args = parser.parse_args(argv)
    try:
        a, b = load_summary(args.result_a), load_summary(args.result_b)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"error: cannot read a summary: {error}", file=sys.stderr)
        return 2
    print(format_comparison(a, b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
