"""Who gives way when KV and the step's activations both want the pool (eLLM's arbiter), judged by the SLO.

The scheduler asks the arbiter once per step, before it plans anything, with an `ArbiterView`: the pool as
the chunk policy sees it (`StepMemory`) with the policy's budget for it, the token cap the TPOT target puts
on the step (None when there is no target or the TTFT override lifted it), the most urgent admitted prompt
with its TTFT target, and the running decodes that could be swapped out, youngest first. The answer is a
`Decision`: the step's token budget and the requests to swap out before planning it. Three outcomes,
named in `Decision.action`:

- `grow`: KV gives chunks to activations. The chunk policy's budget is above its floor: the free and
  reclaimable chunks left after the running requests' next KV and the prefill's own KV pay for a larger
  workspace (engine/core/chunk_policy.py).
- `shrink`: activations shrink. The budget is the policy's floor, or the TPOT cap when that is lower
  (a smaller chunk, so a decode step stays within its target).
- `swap`: a request is swapped. Only under the `slo` arbiter, and only when all of these hold: a TTFT target
  is set; the urgent prompt is predicted to miss it at the `grow`/`shrink` budget; some larger candidate
  budget (within the cap) is predicted to meet it once the fewest youngest decodes are swapped out to make
  its workspace fit; and every one of those victims has the TPOT slack to wait out the prompt's prefill
  (no TPOT target: any decode may wait). Otherwise no one is swapped: a miss that swapping cannot turn into
  a hit is not worth stalling decodes for.

Contract of `MemoryArbiter.decide`: no side effects besides counting its decisions (`actions`, `num_victims`);
`victims` are taken from `view.victims` in that order (a prefix of the eligible ones); the budget is at
least 1, at most the chunk policy's ceiling, and never above `view.cap`; with the `kv_first` arbiter it is
exactly `min(view.policy_budget, cap)` with no victims (the engine's behaviour before the arbiter existed).
Predicted times come from the scheduler's `StepCostModel`: a prompt with L tokens left takes
ceil(L / (budget - decodes)) steps of `step_ms(budget)` each, plus the victims' swap-out copy time.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from engine.core.chunk_policy import AdaptiveChunkPolicy, ChunkPolicy, StepMemory
from engine.core.sampling_workspace import SampledRows

ARBITERS = ("kv_first", "slo")


@dataclass(frozen=True)
class UrgentPrompt:
    """The admitted prompt without its first token that arrived first."""

    request_id: str
    waited_ms: float  # since arrival
    tokens_left: int  # prompt tokens still to compute
    ttft_target_ms: float  # its class's TTFT target


@dataclass(frozen=True)
class SwapCandidate:
    """A running decode that could be swapped out to make room (the scheduler lists them youngest first)."""

    request_id: str
    freed_chunks: int  # chunks its swap-out gives back
    next_kv_chunks: int  # what its next token would have taken
    row: SampledRows  # its sampled row
    slack_ms: float  # how long it can wait and keep its mean TPOT within target (inf: no target)
    swap_ms: float  # predicted copy time of its swap-out


@dataclass(frozen=True)
class ArbiterView:
    memory: StepMemory
    policy_budget: int  # the chunk policy's budget for `memory` (before the cap)
    cap: int | None  # the TPOT target's token cap for this step (None: none)
    prompt: UrgentPrompt | None
    victims: tuple[SwapCandidate, ...]  # youngest first
    num_decodes: int  # decodes this step would run


@dataclass(frozen=True)
class Decision:
    budget: int
    action: str  # "grow" | "shrink" | "swap"
    victims: tuple[str, ...] = ()


class MemoryArbiter:
    """`kv_first` (the default: KV keeps what it needs, activations get what is left) or `slo` (also
    swaps decodes out so a prompt about to miss its TTFT target gets a larger chunk)."""

    def __init__(self, chunk_policy: ChunkPolicy, step_ms: Callable[[int], float], mode: str = "kv_first"):
        if mode not in ARBITERS:
            raise ValueError(f"memory arbiter must be one of {ARBITERS}, got {mode!r}")
        self.chunk_policy = chunk_policy
        self.step_ms = step_ms
        self.mode = mode
        self.actions: Counter[str] = Counter()
        self.num_victims = 0

    def decide(self, view: ArbiterView) -> Decision:
        decision = self._decide(view)
        self.actions[decision.action] += 1
        self.num_victims += len(decision.victims)
        return decision

    def _decide(self, view: ArbiterView) -> Decision:
        budget = _capped(view.policy_budget, view.cap)
        action = "grow" if budget > self.chunk_policy.floor else "shrink"
        if self.mode == "slo" and view.prompt is not None:
            swap = self._swap_for_ttft(view, budget)
            if swap is not None:
                return swap
        return Decision(budget, action)

    def _predicted_ttft_ms(self, prompt: UrgentPrompt, budget: int, num_decodes: int, swap_ms: float) -> float:
        per_step = max(1, budget - num_decodes)
        return prompt.waited_ms + swap_ms + math.ceil(prompt.tokens_left / per_step) * self.step_ms(budget)

    def _swap_for_ttft(self, view: ArbiterView, budget: int) -> Decision | None:
        prompt, policy = view.prompt, self.chunk_policy
        if not isinstance(policy, AdaptiveChunkPolicy):
            return None
        if self._predicted_ttft_ms(prompt, budget, view.num_decodes, 0.0) <= prompt.ttft_target_ms:
            return None  # it meets its target as things are
        larger = sorted(b for b in policy.candidates if b > budget and (view.cap is None or b <= view.cap))
        for target_budget in larger:  # the smallest budget that meets the target, with the fewest victims
            memory, victims, swap_ms = view.memory, [], 0.0
            for candidate in view.victims:
                if policy.fits(target_budget, memory):
                    break
                memory = _without(memory, candidate)
                victims.append(candidate)
                swap_ms += candidate.swap_ms
            if not victims or not policy.fits(target_budget, memory):
                continue  # fits without swapping (then the policy would have chosen it) or never fits
            decodes = view.num_decodes - len(victims)
            predicted = self._predicted_ttft_ms(prompt, target_budget, decodes, swap_ms)
            if predicted > prompt.ttft_target_ms:
                continue
            wait_ms = predicted - prompt.waited_ms
            if all(candidate.slack_ms >= wait_ms for candidate in victims):
                return Decision(target_budget, "swap", tuple(candidate.request_id for candidate in victims))
        return None


def _capped(budget: int, cap: int | None) -> int:
    return budget if cap is None else max(1, min(budget, cap))


def _without(memory: StepMemory, candidate: SwapCandidate) -> StepMemory:
    """The pool as the policy sees it once `candidate` is swapped out."""
    return replace(memory, available_chunks=memory.available_chunks + candidate.freed_chunks,
                   next_kv_chunks=memory.next_kv_chunks - candidate.next_kv_chunks,
                   num_running=memory.num_running - 1, sampled_rows=memory.sampled_rows - candidate.row)
