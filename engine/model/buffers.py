"""Carves one step's activation buffers out of a flat byte workspace.

The workspace lives in the pool's `activations` balloon (the runner maps it before the step), so the
large intermediates of a forward pass take device memory that KV can take back between steps.
"""

from __future__ import annotations

import math

import torch

_ALIGN = 64  # bytes; keeps every buffer cache-line (and vector) aligned


def _aligned(num_bytes: int) -> int:
    return (num_bytes + _ALIGN - 1) // _ALIGN * _ALIGN


class BufferPlan:
    """An ordered list of named (shape, dtype) buffers and their byte offsets in one workspace."""

    def __init__(self, buffers: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        self.buffers = buffers
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, (shape, dtype) in buffers.items():
            self.offsets[name] = offset
            offset += _aligned(math.prod(shape) * dtype.itemsize)
        self.num_bytes = offset

    def carve(self, workspace: torch.Tensor) -> dict[str, torch.Tensor]:
        """Views into `workspace` (a flat uint8 tensor at least `num_bytes` long); no allocation."""
        if workspace.numel() < self.num_bytes:
            raise ValueError(f"workspace of {workspace.numel()} bytes < {self.num_bytes} needed")
        views = {}
        for name, (shape, dtype) in self.buffers.items():
            start = self.offsets[name]
            nbytes = math.prod(shape) * dtype.itemsize
            views[name] = workspace[start : start + nbytes].view(dtype).view(shape)
        return views
