"""The sampler's share of a step's workspace: what the sampled rows ask for, sized before the step runs.

Plain greedy rows need nothing beyond the logits (one fp32 argmax). The other rows need vocabulary-wide
temporaries, 1 MiB per row for Gemma 3's 262,144 entries, which the sampler carves from the step's
pool-backed workspace (the `activations` balloon) instead of taking them from torch's allocator:

- a greedy row whose logits are edited (penalties, a `min_tokens` stop mask): one processed copy;
- a drawn (non-greedy) row: its processed and tempered logits, reused for the cumulative sums, and its
  probabilities: two rows;
- a row that reports logprobs: one `log_softmax` row;
- any row that filters (top-k, top-p, min-p): one scratch for the whole step, used one row at a time:
  the sorted candidates (values and indices), their cumulative sums and a mask.

`SampledRows` counts these per kind. The scheduler adds each sampled request's `row_demand` as it plans
(so admission, the adaptive prefill chunk and preemption see the sampler's memory too) and the runner
sizes the same plan from the same states; `peak_rows` is what a static split must reserve at start.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from engine.model.buffers import BufferPlan
from engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampledRows:
    """How many of a step's sampled rows need each kind of sampler temporary."""

    num_rows: int = 0  # every sampled row (the model's logits buffer has one per row)
    num_edited: int = 0  # greedy rows whose logits are edited first: one processed copy each
    num_drawn: int = 0  # non-greedy rows: tempered logits / cumulative sums and probabilities
    num_logprobs: int = 0  # rows that report logprobs: one log_softmax row each
    num_filtered: int = 0  # drawn rows with top-k, top-p or min-p (one scratch serves them all)

    # field by field, spelled out: the scheduler adds these for every running request several times a step
    # (a generic loop over `dataclasses.fields`: the schedule of a 64-request decode step 2.14 -> 1.74 ms)
    def __add__(self, other: SampledRows) -> SampledRows:
        return SampledRows(self.num_rows + other.num_rows, self.num_edited + other.num_edited,
                           self.num_drawn + other.num_drawn, self.num_logprobs + other.num_logprobs,
                           self.num_filtered + other.num_filtered)

    def __sub__(self, other: SampledRows) -> SampledRows:
        return SampledRows(self.num_rows - other.num_rows, self.num_edited - other.num_edited,
                           self.num_drawn - other.num_drawn, self.num_logprobs - other.num_logprobs,
                           self.num_filtered - other.num_filtered)

    @classmethod
    def plain(cls, num_rows: int) -> SampledRows:
        """`num_rows` plain greedy rows."""
        return cls(num_rows=num_rows)

    @classmethod
    def of(cls, demands: Iterable[SampledRows]) -> SampledRows:
        total = cls()
        for demand in demands:
            total += demand
        return total


NO_ROWS = SampledRows()


def row_demand(params: SamplingParams, needs_stop_mask: bool) -> SampledRows:
    """What one sampled row of a request with these parameters asks for in this step."""
    drawn = not params.is_greedy
    edited = not drawn and (needs_stop_mask or params.has_penalties)
    filtered = drawn and (params.has_top_k or params.top_p < 1.0 or params.min_p > 0.0)
    return SampledRows(1, int(edited), int(drawn), int(params.logprobs is not None), int(filtered))


def peak_rows(max_num_seqs: int, logprobs: bool = True) -> SampledRows:
    """The most a step can ask for: every row drawn, filtered and (unless the engine serves no logprobs:
    `max_logprobs` None) reporting logprobs."""
    return SampledRows(max_num_seqs, 0, max_num_seqs, max_num_seqs if logprobs else 0, max_num_seqs)


def sampling_plan(rows: SampledRows, vocab_size: int) -> BufferPlan:
    """The sampler's buffers for a step with these rows (zero bytes when every row is plain greedy)."""
    scratch = vocab_size if rows.num_filtered else 0
    return BufferPlan(
        {
            "edited": ((rows.num_edited, vocab_size), torch.float32),
            "tempered": ((rows.num_drawn, vocab_size), torch.float32),
            "probabilities": ((rows.num_drawn, vocab_size), torch.float32),
            "logprobs": ((rows.num_logprobs, vocab_size), torch.float32),
            "candidates": ((scratch,), torch.float32),
            "candidate_ids": ((scratch,), torch.int64),
            "candidate_sums": ((scratch,), torch.float32),
            "mask": ((scratch,), torch.bool),
        }
    )
