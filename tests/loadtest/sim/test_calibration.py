"""The cost model with this box's constants predicts the recorded CPU step times of the real engine within
±20% (loadtest/sim/calibration.json; re-record with `python -m loadtest.sim calibrate --record`)."""

from __future__ import annotations

import json

from loadtest.sim.calibrate import CALIBRATION_FILE, DECODE_BATCHES, PREFILL_SHAPES, TOLERANCE, compare


def test_the_cost_model_predicts_every_recorded_scenario_within_tolerance():
    data = json.loads(CALIBRATION_FILE.read_text())
    names = [scenario["name"] for scenario in data["scenarios"]]
    assert names == [f"prefill b={b} n={n}" for b, n in PREFILL_SHAPES] + [f"decode b={b} ctx~130"
                                                                            for b in DECODE_BATCHES]
    assert data["model"] == "smollm2-135m" and data["device"] == "cpu-box"
    errors = {name: predicted / measured - 1 for name, measured, predicted in compare(data)}
    assert all(abs(error) <= TOLERANCE for error in errors.values()), errors
