"""Calibration: the cost model with this box's constants against step times measured on this box.

    python -m loadtest.sim calibrate             # compare the model with loadtest/sim/calibration.json
    python -m loadtest.sim calibrate --record    # measure again (the real engine, SmolLM2, ~2 min), refit

`--record` runs the real engine (engine/, the embedded SmolLM2, bf16 where the CPU has AVX512-BF16/AMX) on
one thread and times single steps of known shape in process CPU time (on one thread that is the step's
time on an otherwise idle core, whatever else the shared box runs): prefill steps of 1-64 requests (8-512 prompt tokens
each) and decode steps of 1-64 requests at a ~130-token context. Each scenario keeps every timed step's
shape (decode contexts, prefill chunks) and seconds. It then fits the `cpu-box` device's four constants
(flops, memory rate, per-kernel and per-sequence overhead) by minimising the worst relative error over
the scenarios (measured: the lower quartile of each scenario's steps, robust to other processes on a
shared box), and prints them for hardware.py. The check (and tests/loadtest/sim/
test_calibration.py) asserts that every scenario's predicted total is within ±20% of the measured one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from loadtest.sim.cost import CostModel, StepShape
from loadtest.sim.hardware import DeviceSpec, get_device
from loadtest.sim.models import get_model
from loadtest.sim.registry import experiment

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
TOLERANCE = 0.20
DECODE_BATCHES = (1, 2, 4, 8, 16, 32, 64)
PREFILL_SHAPES = ((1, 32), (1, 128), (1, 256), (1, 512), (2, 256), (4, 128), (8, 64), (16, 32), (32, 16), (64, 8))


def _shape(output) -> StepShape:
    return StepShape(tuple(chunk.start + 1 for chunk in output.decodes),
                     tuple((len(chunk.token_ids), chunk.start) for chunk in output.prefills),
                     len(output.decodes) + sum(chunk.samples for chunk in output.prefills))


def _timed_steps(engine, num_steps: int | None = None) -> list[dict]:
    """Runs the engine's own step (schedule, run, update) and times the model run of each."""
    steps = []
    while engine.has_work and (num_steps is None or len(steps) < num_steps):
        plan = engine.scheduler.schedule()
        started = time.process_time()
        result = engine.runner.run(plan, engine._sampling_states(plan))
        seconds = time.process_time() - started
        engine.update(plan, result)
        shape = _shape(plan)
        steps.append({"decode_contexts": list(shape.decode_contexts), "prefills": [list(p) for p in shape.prefills],
                      "num_sampled": shape.num_sampled, "seconds": seconds})
    return steps


def record(repeats: int = 6) -> dict:
    from engine.api import GenerateRequest
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(num_threads=1, enable_prefix_caching=False, max_num_batched_tokens=512))
    rng = np.random.default_rng(0)
    counter = iter(range(1 << 30))

    def add(num: int, prompt: int, max_tokens: int) -> None:
        for _ in range(num):
            tokens = tuple(int(t) for t in rng.integers(100, 40000, prompt))
            engine.add_request(GenerateRequest(f"c{next(counter)}", tokens,
                                               SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))

    add(4, 64, 8)  # warm-up: kernels built, pages mapped once
    _timed_steps(engine)
    scenarios = []
    for batch, prompt in PREFILL_SHAPES:
        steps = []
        for _ in range(repeats):
            add(batch, prompt, 1)
            steps += [step for step in _timed_steps(engine) if step["prefills"]]
        scenarios.append({"name": f"prefill b={batch} n={prompt}", "steps": steps})
    for batch in DECODE_BATCHES:
        add(batch, 128, 2 + 8 * repeats)
        while engine.scheduler.waiting or any(r.is_prefilling for r in engine.scheduler.running):
            _timed_steps(engine, 1)
        _timed_steps(engine, 1)  # the first decode step maps new pages
        steps = [step for step in _timed_steps(engine, 8 * repeats) if not step["prefills"]]
        _timed_steps(engine)
        scenarios.append({"name": f"decode b={batch} ctx~130", "steps": steps})
    engine.close()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return {"model": "smollm2-135m", "device": "cpu-box", "dtype": "bfloat16 (auto)", "torch_threads": 1,
            "clock": "process CPU time per step (robust to other processes on a shared box)",
            "cpu_flags": sorted({f for f in ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags}),
            "machine": platform.machine(), "load_average": os.getloadavg()[0],
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "scenarios": scenarios}


def _shapes(scenario: dict) -> list[StepShape]:
    return [StepShape(tuple(s["decode_contexts"]), tuple(tuple(p) for p in s["prefills"]), s["num_sampled"])
            for s in scenario["steps"]]


def compare(data: dict, device: DeviceSpec | None = None) -> list[tuple[str, float, float]]:
    """(scenario, measured seconds per step, predicted seconds per step). Measured: the lower quartile of the
    scenario's steps (they have nearly one shape), robust to other processes on a shared box; predicted: the
    mean over the same steps."""
    cost = CostModel(get_model(data["model"]), device or get_device(data["device"]))
    rows = []
    for scenario in data["scenarios"]:
        measured = float(np.percentile([step["seconds"] for step in scenario["steps"]], 25))
        predicted = float(np.mean([cost.step_s(shape) for shape in _shapes(scenario)]))
        rows.append((scenario["name"], measured, predicted))
    return rows


def _worst_error(data: dict, device: DeviceSpec) -> float:
    return max(abs(predicted / measured - 1) for _, measured, predicted in compare(data, device))


def fit(data: dict, start: DeviceSpec) -> DeviceSpec:
    """The four constants minimising the worst relative error (coordinate search in log space)."""
    names = ("flops", "hbm_bytes_per_s", "kernel_overhead_s", "seq_overhead_s")
    best = start
    best_error = _worst_error(data, best)
    step = 1.0
    while step > 0.002:
        improved = False
        for name in names:
            for direction in (1, -1):
                candidate = replace(best, **{name: getattr(best, name) * math.exp(direction * step)})
                error = _worst_error(data, candidate)
                if error < best_error:
                    best, best_error, improved = candidate, error, True
        if not improved:
            step /= 2
    return best


def _arguments(parser) -> None:
    parser.add_argument("--record", action="store_true", help="measure again with the real engine (~2 min, "
                        "run on a quiet box) and refit the cpu-box constants")
    parser.add_argument("--fit", action="store_true", help="refit the cpu-box constants to the recorded steps")


@experiment("calibrate", "the cost model against step times measured on this box (SmolLM2)", _arguments)
def main(args) -> int:
    if args.record:
        data = record()
        CALIBRATION_FILE.write_text(json.dumps(data, indent=1) + "\n")
        print(f"recorded {len(data['scenarios'])} scenarios to {CALIBRATION_FILE} (load {data['load_average']:.2f})")
    data = json.loads(CALIBRATION_FILE.read_text())
    device = get_device(data["device"])
    if args.record or args.fit:
        device = fit(data, device)
        print("fitted cpu-box constants (put them in loadtest/sim/hardware.py):")
        print(f"  flops={device.flops:.4g}, hbm_bytes_per_s={device.hbm_bytes_per_s:.4g}, "
              f"kernel_overhead_s={device.kernel_overhead_s:.3g}, seq_overhead_s={device.seq_overhead_s:.3g}")
    print(f"SIMULATED vs MEASURED: {data['model']} on {data['device']} ({', '.join(data['cpu_flags'])}; "
          f"{data['torch_threads']} threads; recorded {data['recorded_at']} at load {data['load_average']:.2f})")
    print(f"{'scenario':28s} {'steps':>5s} {'measured ms/step':>17s} {'model ms/step':>14s} {'error':>7s}")
    worst = 0.0
    for (name, measured, predicted), scenario in zip(compare(data, device), data["scenarios"], strict=True):
        error = predicted / measured - 1
        worst = max(worst, abs(error))
        print(f"{name:28s} {len(scenario['steps']):5d} {measured * 1e3:17.2f} {predicted * 1e3:14.2f} {error:+7.1%}")
    median = statistics.median(abs(p / m - 1) for _, m, p in compare(data, device))
    print(f"worst error {worst:.1%} (median {median:.1%}); tolerance ±{TOLERANCE:.0%}")
    return 0 if worst <= TOLERANCE else 1
