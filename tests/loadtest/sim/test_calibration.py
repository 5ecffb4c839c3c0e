"""The cost model with this box's constants predicts the recorded CPU step times of the real engine within
±20% (loadtest/sim/calibration.json; re-record with `python -m loadtest.sim calibrate --record`), and the h200
constants predict step times measured on an H200 within ±30% (loadtest/sim/gpu_calibration.json)."""

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


def test_the_h200_constants_predict_steps_measured_on_an_h200_within_tolerance():
    """loadtest/sim/gpu_calibration.json: Llama-3-8B-shaped steps replayed from CUDA graphs on an H200 (the device
    time the roofline describes; `python -m loadtest.sim gpu-calibrate --record --engine torch-graph`)."""
    from loadtest.sim.gpu_calibration import GPU_CALIBRATION_FILE, GPU_TOLERANCE
    from loadtest.sim.gpu_calibration import compare as compare_gpu

    data = json.loads(GPU_CALIBRATION_FILE.read_text())
    assert (data["model"], data["device"], data["gpu"], data["engine"]) == (
        "llama-3-8b", "h200", "NVIDIA H200", "torch-graph")
    rows = compare_gpu(data)
    assert [row["name"] for row in rows] == [f"prefill n={n}" for n in (512, 2048, 8192)] + [
        f"decode b={b} ctx~1024" for b in (1, 8, 32, 64)]
    errors = {row["name"]: row["predicted"] / row["measured"] - 1 for row in rows}
    assert all(abs(error) <= GPU_TOLERANCE for error in errors.values()), errors
