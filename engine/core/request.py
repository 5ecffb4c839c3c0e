"""A request as the engine tracks it between arrival and its last token."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.core.sampler import SamplingState
from engine.core.sampling_workspace import SampledRows, row_demand
from engine.sampling_params import SamplingParams
from engine.text.detokenizer import IncrementalDetokenizer


class TokenView(Sequence[int]):
    """prompt + output as one sequence, without concatenating them (KV commits slice whole pages of it)."""

    __slots__ = ("_prompt", "_output")

    def __init__(self, prompt: list[int], output: list[int]):
        self._prompt = prompt
        self._output = output

    def __len__(self) -> int:
        return len(self._prompt) + len(self._output)

    def __getitem__(self, index):
        num_prompt = len(self._prompt)
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step == 1 and stop <= num_prompt:
                return self._prompt[start:stop]
            if step == 1 and start >= num_prompt:
                return self._output[start - num_prompt : stop - num_prompt]
            return (self._prompt + self._output)[index]
        if index < 0:
            index += len(self)
        return self._prompt[index] if index < num_prompt else self._output[index - num_prompt]


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not in the KV cache (new, or preempted to recompute)
    RUNNING = "running"  # has a KV slot
    SWAPPED = "swapped"  # KV parked in the host buffer
    PAUSED = "paused"  # keeps its KV slot but is not scheduled (the last stage of a live migration)
    FOLLOWING = "following"  # another choice of its prompt leads the prefill; it forks that KV (engine/core/forks.py)
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    sampling: SamplingState
    detokenizer: IncrementalDetokenizer | None
    arrival_time: float
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache at admission
    num_preemptions: int = 0
    priority: int = 0  # lower is more urgent (vLLM's convention); picks the request's SLO class
    first_scheduled_time: float | None = None  # time.monotonic() when its first prompt chunk was scheduled
    first_token_time: float | None = None
    arrived_unloaded: bool = False  # nobody was queued ahead of it (its TTFT counts toward the baseline)
    finish_reason: str | None = None
    hold_at: int | None = None  # a live migration's reservation: not decoded past this many tokens (migration.hold)
    prompt_group: str | None = None  # the choices of one OpenAI request (n > 1): prefilled once, KV forked

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_at(self, position: int) -> int:
        """all_token_ids[position] without building the whole list (a decode step needs one token)."""
        num_prompt = len(self.prompt_token_ids)
        if position < num_prompt:
            return self.prompt_token_ids[position]
        return self.output_token_ids[position - num_prompt]

    @property
    def tokens(self) -> TokenView:
        """A read-only view of prompt + output: indexing and slicing copy only what they return."""
        return TokenView(self.prompt_token_ids, self.output_token_ids)

    @property
    def is_prefilling(self) -> bool:
        """Still has more than the last token to compute (prompt, or everything after a recompute)."""
        return self.num_computed_tokens < self.num_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def row_demand(self) -> SampledRows:
        """What this request's sampled row asks of the sampler's workspace in the coming step (a request
        without sampling state, as the simulator's, by its parameters)."""
        if self.sampling is None:
            return row_demand(self.params, needs_stop_mask=False)
        return self.sampling.row_demand()
