"""What the memory arbiter (engine/core/memory_arbiter.py) is shown of the scheduler's requests: the urgent
prompt and the decodes that could be swapped out for it."""

from __future__ import annotations

from collections.abc import Sequence

from engine.core.memory_arbiter import SwapCandidate, UrgentPrompt
from engine.core.request import Request
from engine.core.slo import SloTargets
from engine.core.step_cost import StepCostModel
from memory.kv import KVCacheManager


def urgent_prompt(running: Sequence[Request], slo: SloTargets, now: float) -> UrgentPrompt | None:
    """The admitted prompt still in prefill that arrived first, if it has a TTFT target."""
    prompts = [r for r in running if r.first_token_time is None and r.is_prefilling]
    if not prompts:
        return None
    oldest = min(prompts, key=lambda request: request.arrival_time)
    target = slo.ttft_target_ms(oldest)
    if target is None:
        return None
    return UrgentPrompt(oldest.request_id, (now - oldest.arrival_time) * 1e3,
                        oldest.num_tokens - oldest.num_computed_tokens, target)


def wait_slack_ms(request: Request, slo: SloTargets) -> float:
    """How long the request's next token may take and keep its mean TPOT within target: after k intervals
    at mean `observed`, the next may take target + k * (target - observed). No target: forever."""
    target = slo.tpot_target_ms(request)
    if target is None:
        return float("inf")
    observed = slo.observed_tpot_ms(request)
    intervals = max(0, len(request.output_token_ids) - 1)
    return target + intervals * (target - (target if observed is None else observed))


def swap_candidates(running: Sequence[Request], prompt: UrgentPrompt, kv: KVCacheManager, slo: SloTargets,
                    cost: StepCostModel) -> tuple[SwapCandidate, ...]:
    """Running decodes (`running` in admission order) that can be swapped to the host, youngest first,
    with the chunks each gives back and its predicted swap-out time."""
    candidates = []
    for request in reversed(running):
        if request.request_id == prompt.request_id or request.is_prefilling or not kv.can_swap_out(request.request_id):
            continue
        freed = kv.chunks_freed_by_swap(request.request_id)
        candidates.append(SwapCandidate(
            request.request_id, freed, kv.chunks_to_grow(request.request_id, request.num_computed_tokens + 1),
            request.row_demand(), wait_slack_ms(request, slo), cost.fetch_ms(freed * kv.pool.chunk_bytes)))
    return tuple(candidates)
