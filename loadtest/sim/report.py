"""Results of one packing-simulation run, and the side-by-side table of several."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from loadtest.sim.packing import Cluster, SimConfig


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


def summarize(cluster: Cluster, end_s: float) -> SimResult:
    config = cluster.config
    requests = cluster.requests
    ttft = np.array([r.first_token_s - r.arrival_s for r in requests])
    tpot = np.array([(r.finish_s - r.first_token_s) / (r.output - 1) if r.output > 1 else 0.0 for r in requests])
    meets = (ttft <= config.slo_ttft_s) & (tpot <= config.slo_tpot_s)
    seconds = sum((r.released_s if r.released_s is not None else end_s) - r.started_s for r in cluster.replicas)
    counts = cluster.counts
    return SimResult(
        policy=config.policy, num_requests=len(requests), end_s=end_s, replica_hours=seconds / 3600,
        peak_replicas=cluster.num_live_peak, ttft_p50_s=float(np.percentile(ttft, 50)),
        ttft_p99_s=float(np.percentile(ttft, 99)), tpot_p99_s=float(np.percentile(tpot, 99)),
        num_preemptions=sum(r.num_preemptions for r in cluster.replicas), num_copies=counts["copies"],
        num_recomputes=counts["recomputes"], num_aborted=counts["aborted"], num_refused=counts["refused"],
        num_fallbacks=counts["fallbacks"], bytes_moved=counts["bytes_moved"],
        slo_attainment=float(meets.mean()))


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


def describe(config: SimConfig) -> str:
    """The constants a run used, in a few lines (printed above the table)."""
    model, replica, policy, cost = config.model, config.replica, config.policy_config, config.policy_config.cost
    kv_bytes = replica.kv_budget_bytes(model)
    page_bytes = replica.tokens_per_page * model.kv_bytes_per_token
    return "\n".join((
        f"model {model.name}: {model.kv_bytes_per_token >> 10} KiB of KV per token, {model.weight_bytes / 1e9:.2f} GB "
        f"of weights; replica: {replica.gpu_bytes / 2**30:.0f} GiB x {replica.gpu_memory_utilization} - weights - "
        f"{replica.activation_reserve_bytes / 2**30:.0f} GiB reserve = {kv_bytes / 2**30:.1f} GiB of KV "
        f"({kv_bytes // page_bytes} pages of {replica.tokens_per_page} tokens), {replica.max_num_seqs} seqs, "
        f"{replica.max_num_batched_tokens} tokens/step, start-up {replica.startup_s:.0f} s",
        f"cost: decode step {cost.decode_base_s * 1e3:g} ms + {cost.decode_per_seq_s * 1e6:g} us/seq + "
        f"{cost.decode_per_context_token_s * 1e9:g} ns/context token; prefill {cost.prefill_per_token_s * 1e6:g} "
        f"us/token + {cost.prefill_attention_per_pair_s * 1e9:g} ns/(query, key); KV copy "
        f"{cost.migration_bandwidth_bytes_per_s / 1e9:g} GB/s + {cost.migration_setup_s * 1e3:g} ms",
        f"controller: every {config.tick_s:g} s; balance {policy.low_watermark:g} -> {policy.high_watermark:g} of KV; "
        f"fleet sized to the {config.scale_down_window_s:g} s peak at {policy.target_load:g} load; "
        f"<= {policy.max_migrations_per_tick} migrations/tick, <= {policy.max_outgoing_per_replica} out and "
        f"{policy.max_incoming_per_replica} in per replica; SLO: TTFT <= {config.slo_ttft_s:g} s, "
        f"TPOT <= {config.slo_tpot_s * 1e3:g} ms"))
