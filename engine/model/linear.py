"""Products with a weight matrix (`x @ w.T`, w stored [out, in]): one object per variant, chosen by name.

- `torch`: torch.mm (MKL / oneDNN on CPUs, cuBLAS on GPUs).
- `native`: fp32 products on CPUs with AVX2/FMA by a C kernel over weights packed at load in panels of 16
  outputs (csrc/gemm_f32.h: BLIS-style outer-product register tiles of 6 rows x 16 outputs), for every row
  count: it streams a weight at close to the memory bandwidth at one row and is FMA-bound from a few rows on.
  Measured 2026-12-07 on a 2-vCPU AMD EPYC with AVX2 only (2 threads, `python -m loadtest.bench.gemm_f32`):
  see csrc/gemm_f32.h and docs/SPEED.md. Other dtypes keep plain weights and torch.mm.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.native_build import load_library

logger = logging.getLogger(__name__)
PANEL = 16  # outputs per panel of a packed fp32 weight (GEMM_F32_PANEL in csrc/gemm_f32.h)
Allocator = Callable[[torch.Tensor], torch.Tensor]  # returns a pool-backed copy of the tensor


class TorchLinear:
    name = "torch"

    def place(self, weight: torch.Tensor, allocate: Allocator):
        """Stores a [out, in] weight (in the model's dtype) through `allocate`; returns what `__call__` takes."""
        return allocate(weight)

    def place_tied(self, embed: torch.Tensor, allocate: Allocator) -> tuple:
        """A tied embedding and lm head (one [vocab, hidden] matrix) through `allocate`: (what `rows` reads,
        what `__call__` takes). Here the one placed matrix serves both (a backend whose `rows` cannot read its
        own layout overrides this)."""
        placed = self.place(embed, allocate)
        return placed, placed

    def rows(self, weight, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out = the rows `ids` of a placed embedding (the first of `place_tied`, or a plain tensor)."""
        return torch.index_select(weight, 0, ids, out=out)

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
        the I gate outputs then the I up outputs; act [rows, I] receives SiLU(gate) x up with
        NativeBf16Elementwise.silu_mul's roundings (the caller takes this path only with those ops, so the bits
        do not depend on it); gate_up [rows, 2 I] is scratch the backend may write the product into. False
        (nothing written): the caller runs the product and silu_mul itself."""
        return False


@dataclass(frozen=True)
class PanelWeight:
    """A [out, in] fp32 weight in csrc/gemm_f32.h's panels: `panels` [ceil(out / 16), in, 16] holds
    weight[16 p + j, c] at [p, c, j] (rows past `out` are zeros)."""

    panels: torch.Tensor
    out_features: int
    in_features: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        return self.panels.device

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """The panels of a [out, in] weight (a new contiguous tensor)."""
        out_features, in_features = weight.shape
        num_panels = -(-out_features // PANEL)
        padded = weight
        if out_features % PANEL:  # the last panel's missing rows are zeros
            padded = weight.new_zeros(num_panels * PANEL, in_features)
            padded[:out_features] = weight
        return padded.view(num_panels, PANEL, in_features).transpose(1, 2).contiguous()

    def unpack(self) -> torch.Tensor:
        """The plain [out, in] weight (a new tensor)."""
        return self.panels.transpose(1, 2).reshape(-1, self.in_features)[: self.out_features].clone()


class NativeLinear(TorchLinear):
    name = "native"

    def __init__(self):
        library = load_library(Path(__file__).parent / "csrc" / "gemm_f32.c")
        self._kernel = library.gemm_f32
        self._kernel.restype = None
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        self._kernel.argtypes = [pointer, int64, pointer, pointer] + [int64] * 5

    def place(self, weight: torch.Tensor, allocate: Allocator):
        """fp32 CPU weights in panels (a PanelWeight over pool memory); any other weight as it is."""
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.dim() != 2:
            return allocate(weight)
        return PanelWeight(allocate(PanelWeight.pack(weight)), *weight.shape)

    def rows(self, weight, ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Reads an embedding's rows out of the panels, so a tied embedding is one copy for both uses."""
        if not isinstance(weight, PanelWeight):
            return super().rows(weight, ids, out)
        return out.copy_(weight.panels[ids // PANEL, :, ids % PANEL])  # [tokens, in]: weight[ids]

    def __call__(self, x: torch.Tensor, weight, out: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(weight, PanelWeight):
            return super().__call__(x, weight, out, bias)
        if not self._fits(x, weight, out):
            return super().__call__(x, weight.unpack(), out, bias)  # a shape or layout the kernel does not take
        if x.shape[0]:
            self._kernel(x.data_ptr(), x.stride(0), weight.panels.data_ptr(), out.data_ptr(), out.stride(0),
                         x.shape[0], weight.out_features, weight.in_features, torch.get_num_threads())
        if bias is not None:
            out += bias
        return out

    @staticmethod
    def _fits(x: torch.Tensor, weight: PanelWeight, out: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype == out.dtype == torch.float32 and x.stride(1) == 1
                and out.stride(1) == 1 and out.shape == (x.shape[0], weight.out_features)
                and x.shape[1] == weight.in_features)
