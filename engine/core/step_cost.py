"""A running estimate of step time as a function of its token count (for SLO-aware budgets)."""

from __future__ import annotations


class StepCostModel:
    """step_ms ≈ base_ms + per_token_ms * num_tokens, fitted by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.95, base_ms: float = 20.0, per_token_ms: float = 1.0):
        self.decay = decay
        self.base_ms = base_ms
        self.per_token_ms = per_token_ms
        self._sums = [0.0] * 5  # weight, sum x, sum y, sum xx, sum xy

    def observe(self, num_tokens: int, step_ms: float) -> None:
        w, sx, sy, sxx, sxy = (value * self.decay for value in self._sums)
        x, y = float(num_tokens), step_ms
        self._sums = [w + 1, sx + x, sy + y, sxx + x * x, sxy + x * y]
        w, sx, sy, sxx, sxy = self._sums
        variance = sxx * w - sx * sx
        if w >= 3 and variance > 1e-9:
            slope = (sxy * w - sx * sy) / variance
            if slope > 0:
                self.per_token_ms = slope
                self.base_ms = max(0.0, (sy - slope * sx) / w)

    def predict_ms(self, num_tokens: int) -> float:
        return self.base_ms + self.per_token_ms * num_tokens

    def max_tokens_within(self, budget_ms: float) -> int:
        return max(1, int((budget_ms - self.base_ms) / self.per_token_ms))
