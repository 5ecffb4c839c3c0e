"""CarryPolicy: copy a request's KV across a drop or restore when that beats recomputing it."""

from __future__ import annotations

import pytest

from engine.cooperative.carry import CarryPolicy
from engine.core.step_cost import StepCostModel


def test_auto_copies_when_moving_bytes_beats_recomputing():
    cost = StepCostModel(base_ms=10.0, per_token_ms=1.0)  # 100 tokens: 110 ms to recompute
    policy = CarryPolicy("auto", bandwidth_bytes_per_s=1e9)
    assert policy.copies(100, 100_000_000, cost)  # 100 ms of copying < 110 ms
    assert not policy.copies(100, 120_000_000, cost)  # 120 ms > 110 ms
    assert CarryPolicy("copy").copies(1, 10**15, cost) and not CarryPolicy("recompute").copies(10**6, 1, cost)
    with pytest.raises(ValueError):
        CarryPolicy("swap")
