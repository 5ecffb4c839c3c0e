"""The decoder's elementwise ops (residual add + RMSNorm, RoPE, SiLU x up): one object per variant, by dtype.

- `TorchElementwise`: torch ops in transformers' order and dtypes (fp32 outputs equal transformers' bit for
  bit; tests/engine/core/test_engine_exactness.py).
- `NativeElementwise`: each op one pass in C instead of 2-10 torch ops (a dispatch, an OpenMP fork/join and a
  pass over memory each), for bf16 (`NativeBf16Elementwise`, csrc/elementwise_bf16.c: rounding to bf16 where
  the torch ops round) and for fp32 on AVX2/FMA (`NativeF32Elementwise`, csrc/elementwise_f32.c: a few ulps
  from torch's fp32 ops in RMSNorm's mean and SiLU's exp; greedy tokens equal transformers' in the exactness
  tests). At batch 1 a decode step runs ~30 of these per layer, and in a prompt chunk of 1,024 tokens the
  torch ops' passes over memory were ~9% of the step (fp32, AVX2 box, 2026-12-07). Anything else (other
  devices, layouts the kernels do not take) goes to the torch ops.

`create_elementwise(dtype)` picks the native one for bf16 and fp32 where the C kernels build.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.model.rope import apply_rope
from engine.native_build import load_library

logger = logging.getLogger(__name__)


class TorchElementwise:
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
        # transformers' order: normalise in fp32, cast back, then scale
        variance = x.float().pow(2).mean(-1, keepdim=True)
        torch.mul(x, torch.rsqrt(variance + eps), out=out)
        return out.mul_(weight)

    def add_rms_norm(self, hidden: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                     out: torch.Tensor, eps: float) -> torch.Tensor:
        """hidden += delta (the residual, in place; skipped for None), then out = rms_norm(hidden)."""
        if delta is not None:
            hidden.add_(delta)
        return self.rms_norm(hidden, weight, out, eps)

    def rope(self, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(q, k) [T, heads, D] rotated by cos/sin [T, 1, D]; may rotate in place and return the same views."""
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    def silu_mul(self, gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        width = gate_up.shape[1] // 2
        return torch.mul(F.silu(gate_up[:, :width]), gate_up[:, width:], out=out)


class NativeElementwise(TorchElementwise):
    """The C kernels for `DTYPE` (csrc/elementwise_<SUFFIX>.c: add_rms_norm_<SUFFIX>, rope_<SUFFIX>,
    silu_mul_<SUFFIX>, one signature for every dtype)."""

    DTYPE: torch.dtype  # set by each variant below
    SUFFIX: str

    def __init__(self):
        library = load_library(Path(__file__).parent / "csrc" / f"elementwise_{self.SUFFIX}.c")
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self._norm = getattr(library, f"add_rms_norm_{self.SUFFIX}")
        self._norm.argtypes = [pointer] * 4 + [int64] * 4 + [ctypes.c_float, int64]
        self._rope = getattr(library, f"rope_{self.SUFFIX}")
        self._rope.argtypes = [pointer] + [int64] * 4 + [pointer, pointer, int64, int64]
        self._silu_mul = getattr(library, f"silu_mul_{self.SUFFIX}")
        self._silu_mul.argtypes = [pointer, pointer, int64, int64, int64]
        for function in (self._norm, self._rope, self._silu_mul):
            function.restype = None

    def _takes(self, *tensors: torch.Tensor) -> bool:
        return all(t.dtype == self.DTYPE and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)

    def _norm_takes(self, hidden, delta, weight, out) -> bool:
        return (hidden.dim() == 2 and self._takes(hidden, weight, out, *(() if delta is None else (delta,)))
                and (delta is None or delta.is_contiguous()))

    def add_rms_norm(self, hidden, delta, weight, out, eps):
        if not self._norm_takes(hidden, delta, weight, out):
            return super().add_rms_norm(hidden, delta, weight, out, eps)
        self._norm(hidden.data_ptr(), None if delta is None else delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                   hidden.shape[0], hidden.shape[1], hidden.stride(0), out.stride(0), eps, torch.get_num_threads())
        return out

    def rms_norm(self, x, weight, out, eps):
        if not self._norm_takes(x, None, weight, out):
            return super().rms_norm(x, weight, out, eps)
        return self.add_rms_norm(x, None, weight, out, eps)

    def rope(self, q, k, cos, sin):
        head_dim = q.shape[-1]
        # rows may be any distance apart (each tensor passes its own); heads must be packed within a row
        if not (self._takes(q, k, cos, sin) and all(x.shape[1] == 1 or x.stride(1) == head_dim for x in (q, k))
                and cos.stride(0) == sin.stride(0)):
            return super().rope(q, k, cos, sin)
        threads = torch.get_num_threads()
        for x in (q, k):
            self._rope(x.data_ptr(), x.shape[0], x.shape[1], head_dim, x.stride(0), cos.data_ptr(), sin.data_ptr(),
                       cos.stride(0), threads)
        return q, k

    def silu_mul(self, gate_up, out):
        if not (self._takes(gate_up, out) and gate_up.is_contiguous() and out.is_contiguous()):
            return super().silu_mul(gate_up, out)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.shape[0], out.shape[1], torch.get_num_threads())
        return out


class NativeBf16Elementwise(NativeElementwise):
    DTYPE, SUFFIX = torch.bfloat16, "bf16"


class NativeF32Elementwise(NativeElementwise):
    DTYPE, SUFFIX = torch.float32, "f32"


_NATIVE = {variant.DTYPE: variant for variant in (NativeBf16Elementwise, NativeF32Elementwise)}


def create_elementwise(dtype: torch.dtype, device: str = "cpu") -> TorchElementwise:
    variant = _NATIVE.get(dtype)
    if variant is None or device != "cpu":
        return TorchElementwise()
    try:
        return variant()
    except (RuntimeError, OSError) as error:
        logger.warning("native %s elementwise kernels unavailable (%s); using torch ops", variant.SUFFIX, error)
        return TorchElementwise()
