"""What the scheduler plans with and hands out: its config, one step's plan (`SchedulerOutput` of
`ScheduledChunk`s) and the step being built (`StepBuilder`: requests' tokens added, and taken back when one
is preempted). The scheduler is engine/core/scheduler.py, which re-exports these names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.core.offload_policy import OFFLOAD_POLICIES
from engine.core.request import Request
from engine.core.sampling_workspace import NO_ROWS, SampledRows


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    preemption_mode: str = "auto"  # "auto" | "swap" | "recompute"
    tpot_slo_ms: float | None = None  # decode steps should not get slower than this
    ttft_slo_ms: float | None = None
    kv_offload: str = "none"  # "none" | "layerwise" (engine/core/offload_policy.py)
    memory_arbiter: str = "kv_first"  # "kv_first" | "slo" (engine/core/memory_arbiter.py)
    priority_scale: float = 2.0  # SLO class targets = targets * scale ** priority (engine/core/slo.py)
    # pace decodes and budget prefill tokens to this fraction of the TPOT target (pacing *to* the target leaves
    # half the requests above it)
    tpot_margin: float = 0.8

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if not 0 < self.tpot_margin <= 1:
            raise ValueError(f"tpot_margin must be in (0, 1], got {self.tpot_margin}")
        if self.kv_offload not in OFFLOAD_POLICIES:
            raise ValueError(f"kv_offload must be one of {sorted(OFFLOAD_POLICIES)}, got {self.kv_offload!r}")


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    slot: int  # KV slot (read after every slot move of this step)
    start: int  # first position computed in this step
    token_ids: tuple[int, ...]  # the tokens whose K/V this step computes
    samples: bool  # True when the chunk ends at the request's last token (its logits are sampled)


@dataclass(frozen=True)
class SchedulerOutput:
    """The plan for one step: everything the runner needs and nothing else."""

    decodes: tuple[ScheduledChunk, ...]  # one token each, ascending slot order
    prefills: tuple[ScheduledChunk, ...]  # prompt chunks (or recompute chunks), in admission order
    preempted: tuple[str, ...]  # requests that lost their KV slot in this step (swap or recompute)
    num_activation_chunks: int  # workspace chunks of this step that KV had to leave free
    sampled_rows: SampledRows = NO_ROWS  # what the step's sampled rows ask of the sampler's workspace
    # (leader id, follower ids): the followers sample their first token from copies of the leader's logits row,
    # right after it in row order, and fork its KV after the step (engine/core/forks.py)
    forks: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(chunk.token_ids) for chunk in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


@dataclass
class StepBuilder:
    """The step being planned: what the scheduler has put in it so far."""

    token_budget: int
    num_tokens: int = 0
    rows: SampledRows = NO_ROWS  # the sampled rows so far, by what they ask of the sampler's workspace
    row_of: dict[str, SampledRows] = field(default_factory=dict)  # request id -> its sampled row
    decode_ids: list[str] = field(default_factory=list)
    prefill_plan: list[tuple[str, int, int]] = field(default_factory=list)  # (id, start, num_tokens)
    preempted: list[str] = field(default_factory=list)
    spans: dict[str, int] = field(default_factory=dict)  # request id -> tokens it has after the step
    forks: dict[str, list[str]] = field(default_factory=dict)  # leader id -> followers forking after the step
    fork_chunks: dict[str, int] = field(default_factory=dict)  # leader id -> chunks its followers' forks take

    @property
    def num_forks(self) -> int:
        return sum(len(followers) for followers in self.forks.values())

    def add(self, request: Request, num_new: int, samples: SampledRows) -> None:
        """Computes `num_new` more tokens of the request in this step (a decode, or a prefill chunk)."""
        if request.is_prefilling:
            self.prefill_plan.append((request.request_id, request.num_computed_tokens, num_new))
        else:
            self.decode_ids.append(request.request_id)
        self.spans[request.request_id] = request.num_computed_tokens + num_new
        self.num_tokens += num_new
        if samples.num_rows:
            self.rows += samples
            self.row_of[request.request_id] = samples

    def remove(self, request_id: str) -> list[str]:
        """Takes back all the step planned for the request (preempted); returns the followers whose forks
        were planned after its first token (unplanned too: their rows left the step)."""
        self.spans.pop(request_id, None)
        self.rows -= self.row_of.pop(request_id, NO_ROWS)
        self.fork_chunks.pop(request_id, None)
        followers = self.forks.pop(request_id, [])
        for follower_id in followers:
            self.rows -= self.row_of.pop(follower_id, NO_ROWS)
        if request_id in self.decode_ids:
            self.decode_ids.remove(request_id)
            self.num_tokens -= 1
        for entry in list(self.prefill_plan):
            if entry[0] == request_id:
                self.prefill_plan.remove(entry)
                self.num_tokens -= entry[2]
        return followers
