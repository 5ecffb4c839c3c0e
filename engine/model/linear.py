"""Products with a weight matrix (`x @ w.T`, w stored [out, in]): one object per variant, chosen by name.

- `torch`: torch.mm (MKL / oneDNN on CPUs, cuBLAS on GPUs).
- `native`: for a CPU fp32 product of a few rows — decode at small batch sizes, which only streams the
  weights — a C kernel that reads each weight row once at close to the memory bandwidth
  (csrc/skinny_gemm.c); torch.mm for everything else. Measured on this 2-core AVX2 machine, whole decode
  steps of SmolLM2 against torch.mm: 2 threads 1.45x at batch 1, 1.97x at 4, 1.58x at 8, 1.24x at 16,
  equal at 32; 1 thread 1.05x at 1, 1.50x at 4, 1.16x at 8, 0.94x at 16. Hence at most
  `ROWS_PER_THREAD` rows per thread, `MAX_ROWS` in all.
- `onednn`: bf16 weights pre-packed for oneDNN at load and kept in the pool (engine/model/onednn_linear.py),
  for AVX512-BF16 / AMX CPUs; fp32 products go to `native` / `torch` as before.
- `auto`: `onednn` where the CPU has AVX512-BF16 or AMX (it only acts on bf16 weights), wrapping `native`
  where that builds (a C compiler and AVX2/FMA), else `torch`.

A backend also decides how a weight is stored (`place`, once at load): the model keeps whatever `place`
returned and passes it back on every call, so a backend may keep weights in its own layout.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from engine.native_build import load_library

logger = logging.getLogger(__name__)
MAX_ROWS = 16
ROWS_PER_THREAD = 8
Allocator = Callable[[torch.Tensor], torch.Tensor]  # returns a pool-backed copy of the tensor


class TorchLinear:
    name = "torch"

    def place(self, weight: torch.Tensor, allocate: Allocator):
        """Stores a [out, in] weight (in the model's dtype) through `allocate`; returns what `__call__` takes."""
        return allocate(weight)

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        """out = x @ weight.T (+ bias), written into `out` (which may be fp32 for bf16 operands: logits)."""
        if out.dtype != x.dtype:
            return out.copy_(torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t()))
        if bias is not None:
            return torch.addmm(bias, x, weight.t(), out=out)
        return torch.mm(x, weight.t(), out=out)

    def gate_up_silu(self, x: torch.Tensor, weight, gate_up: torch.Tensor, act: torch.Tensor) -> bool:
        """An MLP's gate/up product and SiLU x up in one call, where the backend has one: `weight` [2 I, in] holds
        the I gate outputs then the I up outputs; gate_up [rows, 2 I] receives the product and act [rows, I]
        SiLU(gate) x up with NativeBf16Elementwise.silu_mul's roundings (the caller takes this path only with
        those ops, so the bits do not depend on it). False (nothing written): the caller runs the product and
        silu_mul itself."""
        return False


class NativeLinear(TorchLinear):
    name = "native"

    def __init__(self):
        library = load_library(Path(__file__).parent / "csrc" / "skinny_gemm.c")
        self._kernel = library.skinny_gemm_f32
        self._kernel.restype = None
        self._kernel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 5

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None or not self._fits(x, weight, out):
            return super().__call__(x, weight, out, bias)
        self._kernel(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.shape[0], weight.shape[0], weight.shape[1],
                     out.stride(0), torch.get_num_threads())
        return out

    @staticmethod
    def _fits(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
        max_rows = min(MAX_ROWS, ROWS_PER_THREAD * torch.get_num_threads())
        return (0 < x.shape[0] <= max_rows and x.device.type == "cpu" and weight.device.type == "cpu"
                and x.dtype == weight.dtype == out.dtype == torch.float32
                and x.is_contiguous() and weight.is_contiguous() and out.stride(1) == 1
                and out.shape == (x.shape[0], weight.shape[0]) and x.shape[1] == weight.shape[1])
