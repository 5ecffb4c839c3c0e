"""The cost model's GPU constants against our engine's step times on a GPU.

    python -m loadtest.sim gpu-calibrate --record --out FILE   # on a CUDA machine: time the engine (~1 min)
    python -m loadtest.sim gpu-calibrate [--file FILE]         # compare (any machine)

`--record` runs the real engine (engine/, bf16, CUDA VMM backend, contiguous KV) on a Llama-3-8B-shaped
model with random weights (`random:DIR`, engine/weights/random_weights.py) and times single steps of known
shape: prefills of one 512 / 2,048 / 8,192-token prompt, and decode steps of 1 / 8 / 32 / 64 requests at a
~1K-token context. Each timed step is `schedule() -> run() -> update()` in wall-clock time with the device
synchronized before and after (`seconds`, what the simulator's step stands for), with the run's device time
between two CUDA events beside it (`gpu_seconds`). Warm-ups run each shape first. The file also keeps the
device's measured ceilings (a bf16 8192^3 matrix product, a device-to-device copy, pinned host <-> device
copies) and launch costs (a tiny kernel launched eagerly, and replayed from a CUDA graph). `--engine torch-graph`
times the same shapes as a plain-torch step replayed from a CUDA graph (loadtest/sim/gpu_forward.py): the
device time without host overhead. `--profile FILE` writes torch.profiler's table of three engine decode
steps (batch 8) to FILE. Should the engine fail on
the device, the same shapes are timed with transformers' own model of the same config, bf16 (`"engine":
"transformers"` in the file).

The check compares every scenario's median step with the `h200` cost model's prediction for the same step
shapes. loadtest/sim/gpu_calibration.json holds the torch-graph run docs/SIMULATOR.md reports (the device time
the roofline describes; tests/loadtest/sim/test_calibration.py holds the model to it within ±30%), and
loadtest/sim/gpu_engine_steps.json our eager engine's run on the same H200 (host-bound: `--file` compares it).
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.sim.calibrate import _shapes
from loadtest.sim.cost import CostModel
from loadtest.sim.hardware import DeviceSpec, get_device
from loadtest.sim.models import get_model
from loadtest.sim.registry import experiment

GPU_CALIBRATION_FILE = Path(__file__).with_name("gpu_calibration.json")
GPU_TOLERANCE = 0.30


@dataclass(frozen=True)
class Shapes:
    """What a recording times (the defaults are the checked file's; a CPU dry run shrinks them)."""

    prefill: tuple[int, ...] = (512, 2048, 8192)  # one prompt of each length
    decode: tuple[int, ...] = (1, 8, 32, 64)  # batches
    context: int = 1024  # each decoding request's prompt
    repeats: int = 5  # timed prefills per length
    decode_steps: int = 16  # timed decode steps per batch
    device: str = "cuda"
    memory_bytes: int = 100 << 30  # the engine's pool


class _Clock:
    """Wall time between `begin` and the end of `seconds` with the device synchronized at both ends, and
    the device time between CUDA events at `begin` and `end` (the wall time between them on a CPU)."""

    def __init__(self, device: str):
        import torch

        self._cuda = torch.cuda if device == "cuda" else None
        if self._cuda:
            self._cuda.synchronize()
        self._started = time.perf_counter()
        self._events = [self._cuda.Event(enable_timing=True) for _ in range(2)] if self._cuda else []
        self._span = [0.0, 0.0]

    def begin(self) -> None:
        self._events[0].record() if self._cuda else None
        self._span[0] = time.perf_counter()

    def end(self) -> None:
        self._events[1].record() if self._cuda else None
        self._span[1] = time.perf_counter()

    def seconds(self) -> tuple[float, float]:
        """(wall seconds since the clock was made, device seconds between begin and end)."""
        if self._cuda:
            self._cuda.synchronize()
            return time.perf_counter() - self._started, self._events[0].elapsed_time(self._events[1]) / 1e3
        return time.perf_counter() - self._started, self._span[1] - self._span[0]


def _step_record(shape, seconds: float, gpu_seconds: float) -> dict:
    return {"decode_contexts": list(shape.decode_contexts), "prefills": [list(p) for p in shape.prefills],
            "num_sampled": shape.num_sampled, "seconds": seconds, "gpu_seconds": gpu_seconds}


def ceilings() -> dict:
    """The device's bf16 matrix rate and copy bandwidth, measured (random data, warm-ups, CUDA events)."""
    import torch

    def timed(function, repeats: int = 10) -> float:
        for _ in range(3):
            function()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            function()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    matmul_s = timed(lambda: a @ b)
    source = torch.randn(1 << 30, device="cuda", dtype=torch.float32)  # 4 GiB
    target = torch.empty_like(source)
    copy_s = timed(lambda: target.copy_(source))
    pinned = torch.empty(source.numel() // 4, dtype=torch.float32, pin_memory=True)  # 1 GiB
    on_device = source[: pinned.numel()]
    h2d_s = timed(lambda: on_device.copy_(pinned, non_blocking=True), 5)
    d2h_s = timed(lambda: pinned.copy_(on_device, non_blocking=True), 5)
    small = torch.randn(4096, device="cuda")

    def launches() -> None:
        for _ in range(1000):
            small.mul_(1.0)

    launches()
    torch.cuda.synchronize()
    started = time.perf_counter()
    launches()
    torch.cuda.synchronize()
    eager_launch_s = (time.perf_counter() - started) / 1000
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launches()
    graph_kernel_s = timed(graph.replay, 5) / 1000
    return {"bf16_matmul_flops": 2 * 8192 ** 3 / matmul_s, "copy_bytes_per_s": 2 * source.numel() * 4 / copy_s,
            "host_to_device_bytes_per_s": pinned.numel() * 4 / h2d_s,
            "device_to_host_bytes_per_s": pinned.numel() * 4 / d2h_s,
            "eager_launch_s": eager_launch_s, "graph_kernel_s": graph_kernel_s}


def _engine_scenarios(model_name: str, work: Path, shapes: Shapes, profile: Path | None = None) -> list[dict]:
    """The timed scenarios; with `profile`, only torch.profiler's tables of three decode steps at batch 8."""

    from engine.api import GenerateRequest
    from engine.config import EngineConfig
    from engine.core.engine import LLMEngine
    from engine.sampling_params import SamplingParams
    from loadtest.sim.calibrate import _shape

    (work / "config.json").write_text(json.dumps(get_model(model_name).engine_config().to_hf_config()))
    engine = LLMEngine(EngineConfig(model=f"random:{work}", device=shapes.device, dtype="bfloat16",
                                    device_memory_bytes=shapes.memory_bytes, host_buffer_bytes=0,
                                    max_model_len=max(shapes.prefill) + shapes.context + 64,
                                    max_num_seqs=max(shapes.decode), max_num_batched_tokens=max(shapes.prefill),
                                    enable_prefix_caching=False))
    rng = np.random.default_rng(0)
    counter = iter(range(1 << 30))
    vocab = get_model(model_name).vocab_size

    def add(num: int, prompt: int, max_tokens: int) -> None:
        for _ in range(num):
            tokens = tuple(int(t) for t in rng.integers(3, vocab, prompt))
            engine.add_request(GenerateRequest(f"g{next(counter)}", tokens,
                                               SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)))

    def step() -> dict:
        clock = _Clock(shapes.device)
        plan = engine.scheduler.schedule()
        clock.begin()
        result = engine.runner.run(plan, engine._sampling_states(plan))
        clock.end()
        engine.update(plan, result)
        return _step_record(_shape(plan), *clock.seconds())

    def drain() -> list[dict]:
        steps = []
        while engine.has_work:
            steps.append(step())
        return steps

    try:
        if profile is not None:
            _profile_decode(engine, add, step, profile, shapes.context)
            return []
        scenarios = []
        for tokens in shapes.prefill:
            add(1, tokens, 1)
            drain()  # warm-up
            steps = []
            for _ in range(shapes.repeats):
                add(1, tokens, 1)
                steps += [s for s in drain() if s["prefills"]]
            scenarios.append({"name": f"prefill n={tokens}", "steps": steps})
            print(f"  prefill {tokens}: {statistics.median(s['seconds'] for s in steps) * 1e3:.2f} ms", flush=True)
        for batch in shapes.decode:
            add(batch, shapes.context, 3 + shapes.decode_steps)
            while engine.scheduler.waiting or any(r.is_prefilling for r in engine.scheduler.running):
                step()
            for _ in range(2):  # warm-up decodes (the first maps new pages)
                step()
            steps = [s for s in (step() for _ in range(shapes.decode_steps)) if not s["prefills"]]
            drain()
            scenarios.append({"name": f"decode b={batch} ctx~{shapes.context}", "steps": steps})
            print(f"  decode b={batch}: {statistics.median(s['seconds'] for s in steps) * 1e3:.2f} ms", flush=True)
        return scenarios
    finally:
        engine.close()


def _profile_decode(engine, add, step, path: Path, context: int, batch: int = 8) -> None:
    import torch
    from torch.profiler import ProfilerActivity

    add(batch, context, 8)
    while engine.scheduler.waiting or any(r.is_prefilling for r in engine.scheduler.running):
        step()
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.profiler.profile(activities=activities) as profiler:
        seconds = [step()["seconds"] for _ in range(3)]
    averages = profiler.key_averages()
    kernels = sum(event.count for event in averages if event.device_type.name == "CUDA")
    text = [f"three decode steps at batch {batch}, context ~{context}: {[round(t * 1e3, 2) for t in seconds]} ms "
            f"(under the profiler); {kernels} device kernels/copies in all, {kernels / 3:.0f} per step",
            averages.table(sort_by="self_cpu_time_total", row_limit=35)]
    if torch.cuda.is_available():
        text.append(averages.table(sort_by="self_cuda_time_total", row_limit=25))
    path.write_text("\n\n".join(text) + "\n")
    print(text[0], flush=True)


def _transformers_scenarios(model_name: str, shapes: Shapes) -> list[dict]:
    """The same shapes through transformers' model of the same config (bf16, random weights, sdpa)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache

    from loadtest.sim.cost import StepShape

    config = AutoConfig.for_model(**get_model(model_name).engine_config().to_hf_config())
    with torch.device(shapes.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    generator = torch.Generator(device=shapes.device).manual_seed(0)

    def ids(batch: int, length: int):
        return torch.randint(3, config.vocab_size, (batch, length), device=shapes.device, generator=generator)

    def timed(input_ids, cache=None) -> tuple[float, float]:
        """One forward and the greedy tokens of its last position."""
        clock = _Clock(shapes.device)
        clock.begin()
        model(input_ids, past_key_values=cache, logits_to_keep=1).logits.argmax(-1).tolist()
        clock.end()
        return clock.seconds()

    scenarios = []
    with torch.inference_mode():
        for tokens in shapes.prefill:
            steps = []
            for repeat in range(shapes.repeats + 1):
                seconds, gpu = timed(ids(1, tokens))
                if repeat:
                    steps.append(_step_record(StepShape((), ((tokens, 0),), 1), seconds, gpu))
            scenarios.append({"name": f"prefill n={tokens}", "steps": steps})
        for batch in shapes.decode:
            cache = DynamicCache(config=config)
            model(ids(batch, shapes.context), past_key_values=cache, logits_to_keep=1)
            steps = []
            for index in range(2 + shapes.decode_steps):
                seconds, gpu = timed(ids(batch, 1), cache)
                if index >= 2:
                    context = shapes.context + index + 1
                    steps.append(_step_record(StepShape((context,) * batch, (), batch), seconds, gpu))
            scenarios.append({"name": f"decode b={batch} ctx~{shapes.context}", "steps": steps})
    return scenarios


def record(model_name: str = "llama-3-8b", shapes: Shapes | None = None, engine: str = "elastic-serve") -> dict:
    """Times the scenarios with `engine` ("elastic-serve", falling back to transformers should it fail;
    "transformers"; "torch-graph")."""
    import torch

    shapes = shapes or Shapes()
    if shapes.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu-calibrate --record needs a CUDA device")
    on_gpu = shapes.device == "cuda"
    data = {"model": model_name, "device": "h200", "dtype": "bfloat16",
            "gpu": torch.cuda.get_device_name() if on_gpu else "cpu (a dry run)",
            "torch": torch.__version__, "machine": platform.machine(),
            "clock": "wall time of schedule+run+update, device synchronized before and after (seconds); "
                     "CUDA events around the run (gpu_seconds)",
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "ceilings": ceilings() if on_gpu else {"bf16_matmul_flops": 0.0, "copy_bytes_per_s": 0.0}}
    print(f"ceilings: {data['ceilings']}", flush=True)
    if engine == "torch-graph":
        from loadtest.sim.gpu_forward import graph_scenarios

        data["scenarios"] = graph_scenarios(get_model(model_name), shapes.prefill, shapes.decode, shapes.context)
        data["engine"] = engine
        return data
    if engine == "elastic-serve":
        try:
            with tempfile.TemporaryDirectory() as work:
                data["scenarios"] = _engine_scenarios(model_name, Path(work), shapes)
            data["engine"] = engine
            return data
        except Exception:  # the engine failed on the device: keep why, time transformers' model instead
            data["engine_error"] = traceback.format_exc()
            print(data["engine_error"], flush=True)
    data["scenarios"] = _transformers_scenarios(model_name, shapes)
    data["engine"] = "transformers"
    return data


def compare(data: dict, device: DeviceSpec | None = None) -> list[dict]:
    """Per scenario: the median measured step (whole step and device time) and the mean predicted step."""
    cost = CostModel(get_model(data["model"]), device or get_device(data["device"]))
    rows = []
    for scenario in data["scenarios"]:
        predicted = float(np.mean([cost.step_s(shape) for shape in _shapes(scenario)]))
        rows.append({"name": scenario["name"], "steps": len(scenario["steps"]),
                     "measured": statistics.median(s["seconds"] for s in scenario["steps"]),
                     "gpu": statistics.median(s["gpu_seconds"] for s in scenario["steps"]), "predicted": predicted})
    return rows


def _arguments(parser) -> None:
    parser.add_argument("--record", action="store_true", help="time the engine on this machine's GPU")
    parser.add_argument("--out", type=Path, default=None, help="where --record writes (default: the checked file)")
    parser.add_argument("--file", type=Path, default=GPU_CALIBRATION_FILE, help="recorded steps to compare with")
    parser.add_argument("--model", default="llama-3-8b")
    parser.add_argument("--engine", default="elastic-serve", choices=["elastic-serve", "transformers",
                                                                                    "torch-graph"])
    parser.add_argument("--profile", type=Path, default=None, help="only profile three engine decode steps "
                        "(batch 8) and write torch.profiler's tables here")
    parser.add_argument("--dry-run-on-cpu", action="store_true", help="record small shapes on the CPU (checks "
                        "the recording code; the numbers mean nothing)")


@experiment("gpu-calibrate", "the cost model's h200 constants against our engine's steps on a GPU", _arguments)
def main(args) -> int:
    path = args.file
    if args.profile:
        shapes = Shapes((32,), (8,), 32, device="cpu") if args.dry_run_on_cpu else Shapes(prefill=(1024,))
        with tempfile.TemporaryDirectory() as work:
            _engine_scenarios(args.model, Path(work), shapes, args.profile)
        return 0
    if args.record:
        shapes = Shapes((16, 32), (1, 4), 32, 2, 3, "cpu", 2 << 30) if args.dry_run_on_cpu else Shapes()
        data = record(args.model, shapes, args.engine)
        path = args.out or GPU_CALIBRATION_FILE
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"recorded {len(data['scenarios'])} scenarios ({data['engine']}) to {path}")
    data = json.loads(path.read_text())
    rates = data["ceilings"]
    print(f"SIMULATED vs MEASURED: {data['model']} on {data['device']} ({data['gpu']}, {data['engine']}, "
          f"{data['dtype']}; recorded {data['recorded_at']}; measured ceilings "
          f"{rates['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s bf16, {rates['copy_bytes_per_s'] / 1e12:.2f} TB/s copy)")
    print(f"{'scenario':22s} {'steps':>5s} {'step ms':>9s} {'gpu ms':>9s} {'model ms':>9s} {'model/step':>10s}")
    worst = 0.0
    for row in compare(data):
        ratio = row["predicted"] / row["measured"]
        worst = max(worst, abs(ratio - 1))
        print(f"{row['name']:22s} {row['steps']:5d} {row['measured'] * 1e3:9.2f} {row['gpu'] * 1e3:9.2f} "
              f"{row['predicted'] * 1e3:9.2f} {ratio:10.2f}")
    print(f"worst error {worst:.1%}; tolerance ±{GPU_TOLERANCE:.0%}")
    return 0 if worst <= GPU_TOLERANCE else 1
