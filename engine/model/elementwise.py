"""The decoder's elementwise ops (residual add + RMSNorm, RoPE, SiLU x up): one object per variant, by dtype.

- `TorchElementwise`: torch ops in transformers' order and dtypes (fp32 outputs equal transformers' bit for
  bit; tests/engine/core/test_engine_exactness.py).
- `NativeBf16Elementwise`: for bf16 on CPU, each op one pass in C (csrc/elementwise_bf16.c) instead of 3-7
  torch ops, rounding to bf16 where those ops round. At batch 1 a decode step runs ~30 of these per layer,
  and their dispatch overhead was a visible share of a step that only streams 270 MB of weights. Anything
  else (fp32, other devices, layouts the kernels do not take) goes to the torch ops.

`create_elementwise(dtype)` picks the native one for bf16 where the C kernels build.
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


class NativeBf16Elementwise(TorchElementwise):
    def __init__(self):
        library = load_library(Path(__file__).parent / "csrc" / "elementwise_bf16.c")
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self._norm = library.add_rms_norm_bf16
        self._norm.argtypes = [pointer] * 4 + [int64] * 4 + [ctypes.c_float, int64]
        self._rope = library.rope_bf16
        self._rope.argtypes = [pointer] + [int64] * 4 + [pointer, pointer, int64, int64]
        self._silu_mul = library.silu_mul_bf16
        self._silu_mul.argtypes = [pointer, pointer, int64, int64, int64]
        for function in (self._norm, self._rope, self._silu_mul):
            function.restype = None

    @staticmethod
    def _takes(*tensors: torch.Tensor) -> bool:
        return all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1 for t in tensors)

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


def create_elementwise(dtype: torch.dtype, device: str = "cpu") -> TorchElementwise:
    if dtype != torch.bfloat16 or device != "cpu":
        return TorchElementwise()
    try:
        return NativeBf16Elementwise()
    except (RuntimeError, OSError) as error:
        logger.warning("native bf16 elementwise kernels unavailable (%s); using torch ops", error)
        return TorchElementwise()
