"""The offline benchmark's tables: one column per system, then how many times better ours is than each."""

from __future__ import annotations

import os
from collections.abc import Sequence

from loadtest.offline.engine_runner import MIB

HIGHER_IS_BETTER = ("output_tok_s", "prefill_tok_s")
LOWER_IS_BETTER = ("mean_step_ms", "mean_decode_step_ms", "ttft_ms", "tpot_ms", "wall_s")
LABELS = {
    "output_tok_s": "output tok/s", "prefill_tok_s": "prefill tok/s", "mean_step_ms": "mean step ms",
    "mean_decode_step_ms": "mean decode step ms", "tpot_ms": "TPOT ms", "ttft_ms": "TTFT ms (first)",
    "wall_s": "wall s", "num_steps": "steps", "peak_kv": "peak KV", "num_preemptions": "preemptions",
    "peak_activation": "peak activations held",
}


def _format(key: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if key.endswith("_bytes"):
        return f"{value / MIB:.1f} MiB"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"


def speedup(key: str, ours, other) -> float | None:
    """How many times better ours is (>1: ours better), for metrics with a direction."""
    if not ours or not other:
        return None
    if key in HIGHER_IS_BETTER:
        return ours / other
    if key in LOWER_IS_BETTER:
        return other / ours
    return None


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) if index == 0 else cell.rjust(width)
                       for index, (cell, width) in enumerate(zip(row, widths, strict=True))) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def comparison_table(systems: dict[str, dict], keys: Sequence[str]) -> str:
    """One column per system, then 'ours vs X' columns (x times better; >1 = ours better)."""
    names = list(systems)
    others = [name for name in names if name != "ours"]
    header = ["metric", *names, *[f"ours vs {name}" for name in others]]
    rows = [header]
    for key in keys:
        if all(systems[name].get(key) is None for name in names):
            continue
        row = [LABELS.get(key, key), *[_format(key, systems[name].get(key)) for name in names]]
        for name in others:
            ratio = speedup(key, systems["ours"].get(key), systems[name].get(key))
            row.append(f"{ratio:.2f}x" if ratio else "")
        rows.append(row)
    return format_table(rows)


def load_average() -> str:
    return "load avg {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
