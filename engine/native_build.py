"""Builds the engine's plain-C kernels with the system compiler and loads them through ctypes.

No torch headers, no ninja: a kernel compiles in about a second with gcc and is cached by source hash
under ~/.cache/elastic-serve/kernels (ELASTIC_SERVE_CACHE_DIR overrides). Callers catch RuntimeError /
OSError and fall back to torch when no compiler is there.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_LOADED: dict[tuple[Path, tuple[str, ...]], ctypes.CDLL] = {}
_LOCAL_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)


def _source_bytes(source: Path) -> bytes:
    """The source and, recursively, the local headers it includes (`#include "..."`): what the cache key
    must cover so that editing a shared header rebuilds every kernel using it."""
    code = source.read_bytes()
    for name in _LOCAL_INCLUDE.findall(code):
        code += _source_bytes((source.parent / name.decode()).resolve())
    return code


def _cache_dir() -> Path:
    root = os.environ.get("ELASTIC_SERVE_CACHE_DIR") or Path.home() / ".cache" / "elastic-serve"
    return Path(root) / "kernels"


def load_library(source: Path, flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """The compiled `source` (built on first use, once per process and flags). Raises RuntimeError if it cannot
    be. `flags` other than FLAGS build for another target (tests build the AVX2-only variant this way)."""
    if (source, flags) in _LOADED:
        return _LOADED[(source, flags)]
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError(f"no C compiler found to build {source.name}")
    code = _source_bytes(source)
    digest = hashlib.sha256(code + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{source.stem}-{digest}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr}")
            os.replace(built, target)  # atomic: concurrent builders never see half a file
    _LOADED[(source, flags)] = library = ctypes.CDLL(str(target))
    return library


def amx_rows_setting(default: int) -> int:
    """ELASTIC_SERVE_AMX_ROWS, the one switch of the kernels' AMX tiles (`default` when unset): the fewest rows a
    packed product runs on tiles with (engine/model/onednn_linear.py `amx_rows`); 0 turns every tile routine off."""
    return int(os.environ.get("ELASTIC_SERVE_AMX_ROWS", default))


def amx_tiles_allowed() -> bool:
    """Whether kernels may use AMX tiles where the CPU has them (not when ELASTIC_SERVE_AMX_ROWS is 0)."""
    return amx_rows_setting(1) != 0
