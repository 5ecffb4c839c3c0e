"""GGUF tensor bytes -> float32 torch tensors.

The common block formats are decoded with torch ops (about 2x faster than numpy here: 0.27 s vs 0.61 s for SmolLM2),
written as the same float32 operations in the same order as `gguf.quants` so the results are bit-identical
(tests/engine/weights/test_weights.py::test_torch_dequantizers_are_bit_identical_to_gguf_py checks that).
Every other format falls back to `gguf.quants.dequantize`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

QK = 32  # elements per block in Q4_0 / Q4_1 / Q8_0


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """Per-block float16 scale stored at byte `start`, as float32 column [num_blocks, 1]."""
    return blocks[:, start: start + 2].contiguous().view(torch.float16).float()


def _nibbles(quants: torch.Tensor) -> torch.Tensor:
    # Low nibbles hold elements 0..15 of a block, high nibbles 16..31.
    return torch.cat((quants & 0x0F, quants >> 4), dim=1)


def _q4_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 2 + QK // 2)
    return _half(blocks, 0) * (_nibbles(blocks[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 4 + QK // 2)
    return _half(blocks, 0) * _nibbles(blocks[:, 4:]).float() + _half(blocks, 2)


def _q8_0(raw: torch.Tensor) -> torch.Tensor:
    blocks = raw.view(-1, 2 + QK)
    return _half(blocks, 0) * blocks[:, 2:].contiguous().view(torch.int8).float()


def _f32(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float32)


def _f16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.float16).float()


def _bf16(raw: torch.Tensor) -> torch.Tensor:
    return raw.view(torch.bfloat16).float()


TORCH_DEQUANTIZERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    GGMLQuantizationType.F32: _f32,
    GGMLQuantizationType.F16: _f16,
    GGMLQuantizationType.BF16: _bf16,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
}


def dequantize(raw: np.ndarray, quant_type: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one tensor's raw bytes (uint8, read-only is fine) into a float32 tensor of `shape`."""
    decode = TORCH_DEQUANTIZERS.get(quant_type)
    if decode is None:
        decoded = np.ascontiguousarray(gguf_dequantize(raw, quant_type), np.float32)
        return torch.from_numpy(decoded).reshape(shape)
    # A writable copy: torch refuses read-only memory maps, and the bytes are small next to the output.
    data = torch.from_numpy(np.array(raw, dtype=np.uint8, copy=True))
    return decode(data).reshape(shape)
