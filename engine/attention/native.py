"""Loads the C decode-attention kernel (csrc/decode_attention.c), built by engine/native_build.py. If it
cannot be built (no compiler), callers fall back to the pure-torch backend."""

from __future__ import annotations

import ctypes
from pathlib import Path

from engine.native_build import load_library

_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.c"


def load_decode_kernels() -> ctypes.CDLL:
    """The compiled kernel library (built on first use). Raises RuntimeError when it cannot be built."""
    library = load_library(_SOURCE)
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in ("decode_attention_f32", "decode_attention_bf16"):
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [pointer, pointer, pointer, int64, int64, pointer, pointer, int64, int64, int64,
                             int64, int64, ctypes.c_float, pointer, int64]
    library.store_rows.restype = int64
    library.store_rows.argtypes = [pointer, int64, int64, int64, int64, pointer, pointer, int64, pointer, int64, int64]
    return library
