"""Builds and loads the C decode-attention kernel (csrc/decode_attention.c) with the system compiler.

Plain C through ctypes: it compiles in about a second with gcc (no torch headers, no ninja) and is
cached by source hash under ~/.cache/elastic-serve/kernels. If no compiler is found, callers fall
back to the pure-torch backend.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.c"
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_LIBRARY: ctypes.CDLL | None = None


def _cache_dir() -> Path:
    root = os.environ.get("ELASTIC_SERVE_CACHE_DIR") or Path.home() / ".cache" / "elastic-serve"
    return Path(root) / "kernels"


def load_decode_kernels() -> ctypes.CDLL:
    """The compiled kernel library (built on first use). Raises RuntimeError when it cannot be built."""
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler found for the native attention kernel")
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"decode_attention-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling the attention kernel failed:\n{result.stderr}")
            os.replace(built, target)  # atomic: concurrent builders never see half a file
    library = ctypes.CDLL(str(target))
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in ("decode_attention_f32", "decode_attention_bf16"):
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [pointer, pointer, pointer, int64, int64, pointer, pointer, int64, int64, int64,
                             int64, int64, ctypes.c_float, pointer, int64]
    _LIBRARY = library
    return library
