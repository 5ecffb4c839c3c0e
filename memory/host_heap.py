"""The C heap's free pages, given back to the OS.

A model load allocates and frees hundreds of megabytes of host tensors (a GGUF dequantized to fp32, weights
cast, packed, then copied into the pool). glibc serves blocks under its mmap threshold from the heap, and
after the first large free that threshold rises to tens of MB, so almost every weight-sized block comes from
the heap; freed, they stay in the process (SmolLM2 in fp32: 1,060 MB of [heap] RSS after the engine was built,
the pool itself 517 MB). `malloc_trim(0)` returns every free page inside the heap (madvise), not only its top.
Nothing here knows what was loaded: callers trim after a load.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_trim = None


def trim_host_heap() -> bool:
    """Returns the C heap's free pages to the OS; False where the C library has no malloc_trim (not glibc)."""
    global _trim
    if _trim is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _trim = libc.malloc_trim
            _trim.argtypes = [ctypes.c_size_t]
            _trim.restype = ctypes.c_int
        except (OSError, AttributeError):
            _trim = False
    if _trim is False:
        return False
    _trim(0)
    return True
