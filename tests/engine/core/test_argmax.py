"""The native argmax (engine/core/csrc/argmax_rows.c) against torch's argmax(dim=-1): ties (the first index),
rows of -inf, NaNs (the first NaN), lengths around its vector steps, in its AVX-512 and AVX2 builds."""

import ctypes
from pathlib import Path

import pytest
import torch

import engine.core.argmax as argmax_module
from engine.core.argmax import argmax_rows
from engine.native_build import FLAGS, load_library

SOURCE = Path(argmax_module.__file__).parent / "csrc" / "argmax_rows.c"
AVX2_FLAGS = tuple("-march=haswell" if flag == "-march=native" else flag for flag in FLAGS)


def native_argmax(flags: tuple[str, ...]):
    function = load_library(SOURCE, flags).argmax_rows_f32
    function.restype = None
    function.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                         ctypes.c_int64]

    def run(logits: torch.Tensor) -> list[int]:
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        function(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(), 2)
        return out.tolist()

    return run


def awkward_rows(cols: int, seed: int) -> torch.Tensor:
    """Six rows of small integers (many ties), one all -inf, one with a NaN, one whose maximum is last."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (6, cols), generator=generator).float()
    logits[1] = float("-inf")
    logits[2, cols // 2] = float("nan")
    logits[3, -1] = 10.0
    logits[4, : cols // 3] = float("-inf")
    return logits


@pytest.mark.parametrize("flags", [FLAGS, AVX2_FLAGS], ids=["native", "avx2"])
@pytest.mark.parametrize("cols", [1, 7, 31, 32, 63, 64, 65, 100, 49152, 49155])
def test_the_native_argmax_is_torchs(flags, cols):
    run = native_argmax(flags)
    for seed in range(5):
        logits = awkward_rows(cols, seed)
        assert run(logits) == logits.argmax(dim=-1).tolist()
    wide = torch.randn(64, cols, generator=torch.Generator().manual_seed(cols))
    assert run(wide) == wide.argmax(dim=-1).tolist()


def test_argmax_rows_reads_strided_rows():
    logits = torch.randn(8, 1000, generator=torch.Generator().manual_seed(3))[:, :900]
    assert argmax_rows(logits) == logits.argmax(dim=-1).tolist()
