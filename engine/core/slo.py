"""SLO classes and attainment: per-deployment TTFT/TPOT targets scaled by a request's `priority`.

`priority` follows vLLM: an integer, lower is more urgent, 0 by default. A request's class targets are
the deployment's targets times `priority_scale ** priority` (priority clamped to [-4, 4]): with the
default scale 2, priority -1 must start twice as fast and priority 1 may take twice as long. A
request *attains* its SLO when its TTFT and its mean TPOT are both within its class targets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.core.request import Request

_NO_TARGET_SLACK_MS = 1e9  # with no TPOT target, slack orders by priority, then newest first


@dataclass(frozen=True)
class SloTargets:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority_scale: float = 2.0
    # what "now" is (arrival and first-token times are on this clock): the engine's monotonic time, the
    # simulator's virtual time
    clock: Callable[[], float] = field(default=time.monotonic, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.priority_scale < 1:
            raise ValueError("priority_scale must be >= 1")

    def _scale(self, request: Request) -> float:
        return self.priority_scale ** max(-4, min(4, request.priority))

    def ttft_target_ms(self, request: Request) -> float | None:
        return None if self.ttft_ms is None else self.ttft_ms * self._scale(request)

    def tpot_target_ms(self, request: Request) -> float | None:
        return None if self.tpot_ms is None else self.tpot_ms * self._scale(request)

    def ttft_deadline(self, request: Request) -> float:
        """`clock` time by which the first token is due (arrival time without a target)."""
        target = self.ttft_target_ms(request)
        return request.arrival_time + (0.0 if target is None else target / 1e3)

    def observed_tpot_ms(self, request: Request, now: float | None = None) -> float | None:
        if request.first_token_time is None or len(request.output_token_ids) < 2:
            return None
        now = self.clock() if now is None else now
        return (now - request.first_token_time) * 1e3 / (len(request.output_token_ids) - 1)

    def tpot_slack_ms(self, request: Request) -> float:
        """How far the request is inside its TPOT target (negative: missing it). Without a target or
        a measurement yet: lower priority and later arrival mean more slack."""
        target, observed = self.tpot_target_ms(request), self.observed_tpot_ms(request)
        if target is None or observed is None:
            return _NO_TARGET_SLACK_MS * request.priority + request.arrival_time
        return target - observed

    def laxity_ms(self, request: Request, step_ms: float, margin: float = 1.0) -> float:
        """How long (ms) the request may still sit out decode steps and yet finish its outputs within `margin`
        x its TPOT target (a mean over its outputs, as attainment measures it), decoding from now on at
        `step_ms` a token (`max_tokens` outputs assumed: a stop string only ends it sooner). Negative: it
        misses even decoding every step. inf without a TPOT target or before its first token."""
        target = self.tpot_target_ms(request)
        if target is None or request.first_token_time is None:
            return float("inf")
        max_tokens = max(request.params.max_tokens, len(request.output_token_ids))
        remaining = max_tokens - len(request.output_token_ids)
        deadline_ms = request.first_token_time * 1e3 + margin * target * max(max_tokens - 1, 1)
        return deadline_ms - self.clock() * 1e3 - remaining * step_ms

    def urgency(self, request: Request) -> tuple[int, float]:
        """Sort key, most urgent first: priority, then the earliest TTFT deadline."""
        return request.priority, self.ttft_deadline(request)

    def attained(self, request: Request, finished_at: float) -> bool:
        ttft, tpot = self.ttft_target_ms(request), self.tpot_target_ms(request)
        if request.first_token_time is None:
            return False
        if ttft is not None and (request.first_token_time - request.arrival_time) * 1e3 > ttft:
            return False
        observed = self.observed_tpot_ms(request, finished_at)
        return tpot is None or observed is None or observed <= tpot


@dataclass
class SloAttainment:
    """Finished requests that met their class targets, out of all finished (aborts not counted)."""

    num_attained: int = 0
    num_finished: int = 0

    def record(self, attained: bool) -> None:
        self.num_finished += 1
        self.num_attained += int(attained)

    @property
    def ratio(self) -> float:
        return self.num_attained / self.num_finished if self.num_finished else 1.0
