"""Products with a weight matrix (`x @ w.T`, w stored [out, in]): one object per variant, chosen by name.

- `torch`: torch.mm (MKL / oneDNN on CPUs, cuBLAS on GPUs).
- `native`: fp32 products of up to `MAX_ROWS` rows on CPUs with AVX2/FMA by a C kernel over the plain weight
  (csrc/gemm_f32.h: register tiles of 2 weight rows x 6 rows, units claimed by the threads as they come); it
  streams a weight at close to the memory bandwidth at one row and is FMA-bound from a few rows on. torch.mm
  for everything else. Measured 2026-12-07 on a 2-vCPU AMD EPYC with AVX2 only (2 threads, each product with
  its own weight copy, `python -m loadtest.bench.gemm_f32`): 0.3-0.5x torch.mm's time at 1-16 rows, 0.7x at
  32, 0.9x at 64, 0.53x for the 49152x576 lm head at 64 rows; 1.05-1.1x at 128 rows and 1.3x at 512 (hence
  `MAX_ROWS`: prompt chunks keep torch.mm).
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
MAX_ROWS = 64
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
        library = load_library(Path(__file__).parent / "csrc" / "gemm_f32.c")
        self._kernel = library.gemm_f32
        self._kernel.restype = None
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self._kernel.argtypes = [pointer, int64, pointer, pointer] + [int64] * 5

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if bias is not None or not self._fits(x, weight, out):
            return super().__call__(x, weight, out, bias)
        self._kernel(x.data_ptr(), x.stride(0), weight.data_ptr(), out.data_ptr(), out.stride(0), x.shape[0],
                     weight.shape[0], weight.shape[1], torch.get_num_threads())
        return out

    @staticmethod
    def _fits(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
        return (0 < x.shape[0] <= MAX_ROWS and x.device.type == "cpu" and weight.device.type == "cpu"
                and x.dtype == weight.dtype == out.dtype == torch.float32
                and x.stride(1) == 1 and weight.is_contiguous() and out.stride(1) == 1
                and out.shape == (x.shape[0], weight.shape[0]) and x.shape[1] == weight.shape[1])
