"""fp32 products of SmolLM2's shapes side by side: torch.mm, oneDNN on a pre-packed weight, and the engine's own
kernel on the weight packed in panels (engine/model/csrc/gemm_f32.h, the `native` linear backend), at several
row counts, in one process.

Each product gets its own copy of the weight, 8 copies in turn (2 for the 49152x576 lm head), so the weights
stream from beyond L2 as in a model's step; the three contenders alternate call by call; medians of `--repeats`.
On a shared box run it with OMP_WAIT_POLICY=PASSIVE and quote the load average it prints.

    python -m loadtest.bench.gemm_f32 [--rows 1 8 32 64 128 512 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from engine.model.linear import NativeLinear
from loadtest.bench.serve import cpu_flags

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576))  # qkv, o, gate_up, down, lm head


def _contenders(x: torch.Tensor, weights: list[torch.Tensor], out: torch.Tensor, native: NativeLinear) -> dict:
    packed = [torch.ops.mkldnn._reorder_linear_weight(weight, 16) for weight in weights]
    panels = [native.place(weight, lambda tensor: tensor) for weight in weights]
    return {
        "torch.mm": lambda i: torch.mm(x, weights[i].t(), out=out),
        "onednn": lambda i: out.copy_(torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], "")),
        "gemm_f32": lambda i: native(x, panels[i], out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32, 64, 128, 512, 2048])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    native = NativeLinear()
    print(f"flags: {cpu_flags()}; threads {args.threads}; OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}; load average {os.getloadavg()[0]:.2f}")
    print("| shape | rows | torch.mm us | onednn us | gemm_f32 us | gemm_f32 / torch.mm |")
    print("|---|---|---|---|---|---|")
    for out_features, in_features in SHAPES:
        copies = 2 if out_features > 10000 else 8
        weights = [torch.randn(out_features, in_features) for _ in range(copies)]
        for rows in args.rows:
            if out_features > 10000 and rows > 64:  # the lm head only ever sees the sampled rows
                continue
            x, out = torch.randn(rows, in_features), torch.empty(rows, out_features)
            runs = _contenders(x, weights, out, native)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for repeat in range(args.repeats + 3):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run(repeat % copies)
                    if repeat >= 3:
                        times[name].append(time.perf_counter() - started)
            medians = {name: statistics.median(values) * 1e6 for name, values in times.items()}
            print(f"| {out_features}x{in_features} | {rows} | {medians['torch.mm']:.0f} | {medians['onednn']:.0f} | "
                  f"{medians['gemm_f32']:.0f} | {medians['gemm_f32'] / medians['torch.mm']:.2f} |", flush=True)
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
