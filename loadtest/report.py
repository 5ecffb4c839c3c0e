"""What a run leaves behind for people: the summary as a table, and PNG plots over time.

Plots: latency.png (TTFT / TPOT / ITL percentiles per time bucket), throughput.png (output tokens/s,
finished requests/s, requests in flight, and the server's running/waiting gauges when /metrics has them),
memory.png (each replica's pool: the kv / activations / weights balloons, free chunks and the host buffer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from loadtest.metrics import LatencyStats, Summary, TimeBucket  # noqa: E402
from loadtest.telemetry import MemoryPoint, metric_total  # noqa: E402

GIB = 1024**3
BALLOON_ORDER = ("weights", "kv", "activations")
BALLOON_COLORS = {"weights": "tab:blue", "kv": "tab:orange", "activations": "tab:green", "free": "0.85"}


def bucket_width(window_s: float) -> float:
    """About 30 points per plot, never finer than a second."""
    return max(1.0, round(window_s / 30.0))


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _series(buckets: Sequence[TimeBucket], pick) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for bucket in buckets:
        value = pick(bucket)
        if value is not None:
            xs.append(bucket.start_s + bucket.width_s / 2)
            ys.append(value)
    return xs, ys


def plot_latency(buckets: Sequence[TimeBucket], path: Path, title: str) -> None:
    figure, axes = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    for axis, metric in zip(axes, ("ttft_ms", "tpot_ms", "itl_ms"), strict=True):
        for quantile, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            xs, ys = _series(buckets, lambda b, m=metric, q=quantile: getattr(getattr(b, m), q))
            axis.plot(xs, ys, style, marker=".", label=quantile)
        axis.set_ylabel(metric.replace("_ms", "").upper() + " (ms)")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    axes[0].set_title(f"{title}: latency percentiles of requests finishing in each bucket")
    axes[-1].set_xlabel("seconds since the first request")
    _save(figure, path)


def plot_throughput(
    buckets: Sequence[TimeBucket], path: Path, title: str, metrics_rows: Sequence[dict] = (), origin: float = 0.0
) -> None:
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    xs, ys = _series(buckets, lambda b: b.output_tokens_per_s)
    top.plot(xs, ys, marker=".", color="tab:blue", label="output tokens/s")
    top.set_ylabel("output tokens/s")
    top.grid(alpha=0.3)
    rate_axis = top.twinx()
    xs, ys = _series(buckets, lambda b: b.requests_per_s)
    rate_axis.plot(xs, ys, marker=".", color="tab:orange", label="requests/s finished")
    rate_axis.set_ylabel("requests/s")
    errors_x, errors_y = _series(buckets, lambda b: b.num_errors / b.width_s if b.num_errors else None)
    if errors_x:
        rate_axis.plot(errors_x, errors_y, "x", color="tab:red", label="errors/s")
    handles = top.get_legend_handles_labels()[0] + rate_axis.get_legend_handles_labels()[0]
    top.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)
    top.set_title(f"{title}: throughput")
    xs = [b.start_s for b in buckets]
    bottom.step(xs, [b.num_in_flight for b in buckets], where="post", label="in flight (client)")
    for suffix in ("num_requests_running", "num_requests_waiting"):
        points = [
            (row["time"] - origin, metric_total(row.get("values") or {}, suffix))
            for row in metrics_rows
            if row.get("status") == 200
        ]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            bottom.plot(*zip(*points, strict=True), label=f"{suffix} (server)")
    bottom.set_ylabel("requests")
    bottom.set_xlabel("seconds since the first request")
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper left", fontsize=8)
    _save(figure, path)


def plot_memory(points: Sequence[MemoryPoint], path: Path, title: str, origin: float = 0.0, panel: str = "replica",
                xlabel: str = "seconds since the first request") -> None:
    """One stacked panel of balloons per `point.replica` (a replica, or in the offline benchmark a
    configuration), over `point.time - origin`."""
    replicas = sorted({point.replica for point in points})
    if not replicas:
        figure, axis = plt.subplots(figsize=(9, 3))
        axis.text(0.5, 0.5, "no pool telemetry (the server has no /v1/memory)", ha="center", va="center")
        axis.set_axis_off()
        axis.set_title(f"{title}: memory pool")
        _save(figure, path)
        return
    figure, axes = plt.subplots(len(replicas), 1, figsize=(9, 3.2 * len(replicas)), sharex=True, squeeze=False)
    for axis, replica in zip(axes[:, 0], replicas, strict=True):
        series = [point for point in points if point.replica == replica]
        xs = [point.time - origin for point in series]
        clients = sorted(
            {client for point in series for client in point.client_bytes},
            key=lambda c: (BALLOON_ORDER.index(c) if c in BALLOON_ORDER else len(BALLOON_ORDER), c),
        )
        layers = [[point.client_bytes.get(client, 0.0) / GIB for point in series] for client in clients]
        labels = list(clients)
        if any(point.free_bytes is not None for point in series):
            layers.append([(point.free_bytes or 0.0) / GIB for point in series])
            labels.append("free")
        if layers:
            extra_colors = iter(("tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"))
            colors = [BALLOON_COLORS.get(label) or next(extra_colors, "tab:gray") for label in labels]
            axis.stackplot(xs, layers, labels=labels, colors=colors, alpha=0.85, step="post")
        if any(point.host_bytes is not None for point in series):
            axis.plot(xs, [(point.host_bytes or 0.0) / GIB for point in series], "k--", label="host buffer used")
        ranks = max(point.num_ranks for point in series)
        axis.set_title(f"{title}: pool of {panel} {replica} ({ranks} rank{'s' if ranks != 1 else ''})")
        axis.set_ylabel("GiB")
        axis.grid(alpha=0.3)
        axis.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    _save(figure, path)


def _ms(stats: LatencyStats, field: str) -> str:
    value = getattr(stats, field)
    return "-" if value is None else f"{value:.1f}"


def format_summary(summary: Summary) -> str:
    lines = [f"{summary.label or 'run'} · {summary.scenario} · {summary.window_s:.1f} s window "
             "(the makespan: first request sent -> last finished)"]
    lines.append(f"{'latency (ms)':<14}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'count':>9}")
    for name, stats in (
        ("TTFT", summary.ttft_ms),
        ("TPOT", summary.tpot_ms),
        ("ITL", summary.itl_ms),
        ("E2E", summary.e2e_ms),
    ):
        lines.append(
            f"{name:<14}{_ms(stats, 'p50'):>10}{_ms(stats, 'p90'):>10}{_ms(stats, 'p99'):>10}"
            f"{_ms(stats, 'mean'):>10}{stats.count:>9}"
        )
    slo = summary.slo
    attainment = "-" if summary.slo_attainment is None else f"{summary.slo_attainment * 100:.1f}%"
    rows = [
        ("requests", f"{summary.num_requests} ({summary.num_errors} errors, {summary.error_rate * 100:.2f}%)"),
        ("requests/s", f"{summary.requests_per_s:.3f}"),
        ("output tokens/s", f"{summary.output_tokens_per_s:.1f}"),
        ("prompt tokens/s", f"{summary.prompt_tokens_per_s:.1f}"),
        ("SLO", f"TTFT <= {slo.ttft_ms} ms, TPOT <= {slo.tpot_ms} ms: {attainment} of requests"),
        ("goodput", f"{summary.goodput_requests_per_s:.3f} req/s, {summary.goodput_output_tokens_per_s:.1f} tok/s"),
    ]
    if summary.num_output_length_mismatches:
        rows.append(("length mismatch", f"{summary.num_output_length_mismatches} requests (ignore_eos not honoured?)"))
    for message, count in list(summary.errors.items())[:5]:
        rows.append(("error", f"{count} x {message}"))
    lines.extend(f"{name:<16}{value}" for name, value in rows)
    return "\n".join(lines)
