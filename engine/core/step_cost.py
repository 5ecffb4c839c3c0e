"""A running estimate of step time as a function of its token count (for SLO-aware budgets), plus the
time to fetch offloaded layers' KV from the host: bytes ÷ the copy bandwidth measured on past steps."""

from __future__ import annotations


class StepCostModel:
    """step_ms ≈ base_ms + per_token_ms * num_tokens, fitted by exponentially weighted least squares."""

    def __init__(self, decay: float = 0.95, base_ms: float = 20.0, per_token_ms: float = 1.0,
                 copy_bytes_per_ms: float = 5e6):
        self.decay = decay
        self.base_ms = base_ms
        self.per_token_ms = per_token_ms
        self._sums = [0.0] * 5  # weight, sum x, sum y, sum xx, sum xy
        # host -> device staging bandwidth: a prior (5 GB/s, or one copy timed at start-up), then learned
        self.copy_bytes_per_ms = copy_bytes_per_ms

    def observe_copy(self, num_bytes: int, copy_ms: float) -> None:
        """A step staged `num_bytes` of offloaded KV in `copy_ms` of copy time: update the bandwidth."""
        if num_bytes > 0 and copy_ms > 0:
            self.copy_bytes_per_ms = self.decay * self.copy_bytes_per_ms + (1 - self.decay) * num_bytes / copy_ms

    def observe_step(self, num_tokens: int, step_ms: float, fetched_bytes: int = 0, copy_ms: float = 0.0) -> None:
        """One step ran: learn the copy bandwidth from what it staged, and the compute line from its time less
        its copy time unless its copies took half of it or more (a copy-bound step says little about compute).
        Copies overlap compute one layer ahead, but offloaded layers are the top ones, so their copies mostly
        stall the step: step - copy is the compute (exact where nothing overlaps, as on a CPU); learning whole
        steps instead taught 57 ms for a 13 ms decode in the simulator, and that error fed itself (a slower
        predicted step lets more fetches "hide" behind it)."""
        self.observe_copy(fetched_bytes, copy_ms)
        if copy_ms < 0.5 * step_ms:
            self.observe(num_tokens, step_ms - copy_ms)

    def fetch_ms(self, num_bytes: int) -> float:
        return num_bytes / self.copy_bytes_per_ms

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
