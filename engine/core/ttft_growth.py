"""TTFT growth: how much longer requests wait for their first token now than when the replica is unloaded
(KunServe's telemetry: a drop plan reads it beside KV demand and preemptions, deployments/cluster/
drop_plan.py).

Prompts differ in length, so each request's TTFT is taken relative to what the replica's own step-cost
model (engine/core/step_cost.py) predicts for prefilling its prompt alone: `ratio = TTFT / expected`.
The *baseline* is the median ratio of the last `baseline_samples` requests that arrived with nobody
queued ahead of them (it absorbs what the prediction leaves out: the step a request arrives in the middle
of, decodes sharing its steps). The *recent* ratio is the mean over the requests whose first token came
in the last `window_s` seconds, or, if larger, the ratio a request still queued has already reached
(its wait so far over its expected TTFT), so a queue that stopped moving shows at once.

    growth = recent ratio / baseline ratio        (1.0 with no baseline yet or nothing recent)

The live engine (engine/core/engine.py) and the simulator's replicas (loadtest/sim/replica.py) both keep
one and feed it the same way.
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Iterable

from engine.core.step_cost import StepCostModel


def expected_ttft_s(cost_model: StepCostModel, num_prompt_tokens: int, token_budget: int) -> float:
    """The predicted time to prefill a prompt alone, in chunks of the step's token budget."""
    budget = max(1, token_budget)
    full, rest = divmod(max(1, num_prompt_tokens), budget)
    steps_ms = full * cost_model.predict_ms(budget) + (cost_model.predict_ms(rest) if rest else 0.0)
    return max(steps_ms, 1e-3) / 1e3


class TtftGrowth:
    def __init__(self, window_s: float = 10.0, baseline_samples: int = 32, max_recent: int = 512):
        self.window_s = window_s
        self._baseline: deque[float] = deque(maxlen=baseline_samples)
        self._recent: deque[tuple[float, float]] = deque(maxlen=max_recent)  # (first token time, ratio)

    def observe(self, arrival: float, first_token: float, expected_s: float, unloaded: bool) -> None:
        """A request's first token: it arrived at `arrival` (with nobody queued ahead if `unloaded`)."""
        ratio = max(0.0, first_token - arrival) / max(expected_s, 1e-6)
        self._recent.append((first_token, ratio))
        if unloaded:
            self._baseline.append(ratio)

    def growth(self, now: float, queued: Iterable[tuple[float, float]] = ()) -> float:
        """`queued`: (arrival, expected_s) of the requests still waiting for their first token."""
        if not self._baseline:
            return 1.0
        while self._recent and self._recent[0][0] < now - self.window_s:
            self._recent.popleft()
        recent = statistics.fmean(ratio for _, ratio in self._recent) if self._recent else 0.0
        waiting = max((max(0.0, now - arrival) / max(expected, 1e-6) for arrival, expected in queued), default=0.0)
        baseline = max(statistics.median(self._baseline), 1e-6)
        return max(1.0, max(recent, waiting) / baseline)
