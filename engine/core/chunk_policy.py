"""Prefill chunk policies: how many tokens one step may compute (eLLM's elastic activations on CPU).

The scheduler asks its policy once per step for the step's token budget (decodes + prefill tokens).
`FixedChunkPolicy` is today's behaviour: always `max_num_batched_tokens`. `AdaptiveChunkPolicy` lets the
activation workspace swell when KV leaves the pool room: it returns the largest candidate budget (the
floor doubled up to the ceiling) whose workspace, plus the KV the running requests need for their next
token, plus the KV of the prefill tokens themselves, fits in what the pool could hand out now; when
nothing larger fits it returns the floor, and the scheduler then behaves exactly as with a fixed chunk
(admits less, or preempts), so the policy can never deadlock an engine that a fixed chunk would not.

Under the `static` pool policy the workspace share is reserved at start for the ceiling (engine/device/
rank.py sizes it from `max_prefill_chunk_tokens`): that is the baseline eLLM compares to (the peak reserved
whether used or not). The workspace then costs KV nothing, so only the KV term limits the budget there: the
ceiling whenever KV's own (smaller) share has room for that many prompt tokens.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from engine.core.sampling_workspace import SampledRows


@dataclass(frozen=True)
class StepMemory:
    """What the pool looks like when a step is planned."""

    available_chunks: int  # chunks KV and this step's workspace could take now (free + reclaimable)
    next_kv_chunks: int  # chunks the running requests need for their next token
    num_running: int  # running requests (each may add one decode token and one sampled row)
    sampled_rows: SampledRows  # the rows of a step where every running request samples, and one more


class ChunkPolicy(ABC):
    """Contract: `token_budget` returns an int in [floor, ceiling], has no side effect on the pool or the
    KV cache, and returns the floor whenever no larger budget fits (so it never refuses a step a fixed
    budget of `floor` tokens would run). `chosen` counts the budgets returned (for benchmarks)."""

    floor: int
    ceiling: int

    def __init__(self) -> None:
        self.chosen: Counter[int] = Counter()

    def token_budget(self, memory: StepMemory) -> int:
        budget = self._budget(memory)
        self.chosen[budget] += 1
        return budget

    def fitting_budget(self, memory: StepMemory) -> int:
        """What `token_budget` would return, without counting it."""
        return self._budget(memory)

    @abstractmethod
    def _budget(self, memory: StepMemory) -> int: ...


class FixedChunkPolicy(ChunkPolicy):
    """One budget for every step (vLLM's max_num_batched_tokens)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.floor = self.ceiling = tokens

    def _budget(self, memory: StepMemory) -> int:
        return self.floor


class AdaptiveChunkPolicy(ChunkPolicy):
    """The largest of floor, 2*floor, 4*floor, ..., ceiling that fits the pool now.

    `activation_chunks(num_tokens, sampled_rows)` is what the step's workspace costs KV (zero under a
    static split: the reserved share pays); `kv_chunks(num_tokens)` is the KV a fresh request of that
    many tokens takes."""

    def __init__(self, floor: int, ceiling: int, activation_chunks: Callable[[int, SampledRows], int],
                 kv_chunks: Callable[[int], int]):
        super().__init__()
        if not 1 <= floor <= ceiling:
            raise ValueError(f"need 1 <= floor ({floor}) <= ceiling ({ceiling})")
        self.floor, self.ceiling = floor, ceiling
        self.activation_chunks = activation_chunks
        self.kv_chunks = kv_chunks
        sizes, size = [], floor * 2
        while size < ceiling:
            sizes.append(size)
            size *= 2
        self.candidates = tuple(reversed([*sizes, ceiling]))  # largest first; the floor is the fallback

    def fits(self, budget: int, memory: StepMemory) -> bool:
        prefill_tokens = max(0, budget - memory.num_running)
        need = (self.activation_chunks(budget, memory.sampled_rows) + memory.next_kv_chunks
                + self.kv_chunks(prefill_tokens))
        return need <= memory.available_chunks

    def _budget(self, memory: StepMemory) -> int:
        for budget in self.candidates:
            if budget > self.floor and self.fits(budget, memory):
                return budget
        return self.floor


def create_chunk_policy(floor: int, ceiling: int | None, activation_chunks: Callable[[int, SampledRows], int],
                        kv_chunks: Callable[[int], int]) -> ChunkPolicy:
    """Fixed when no ceiling above the floor is configured, adaptive otherwise."""
    if ceiling is None or ceiling <= floor:
        return FixedChunkPolicy(floor)
    return AdaptiveChunkPolicy(floor, ceiling, activation_chunks, kv_chunks)
