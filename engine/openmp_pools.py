"""One OpenMP thread pool per process: the engine loop's.

GNU OpenMP (libgomp, which torch's CPU wheels and our C kernels share) keeps a pool of worker threads for
every thread that starts a parallel region, for as long as that thread lives. While the process holds more
OpenMP threads than it has CPUs, every worker waits for the next region by spinning only 100 times before it
sleeps on a futex (libgomp's `gomp_throttled_spin_count_var`; 300,000 spins, ~3 ms, otherwise), so each of the
~300 parallel regions of a per-op prefill step starts by waking a sleeping thread.

That is what the serving path did: the engine is built on one thread (the replica builds it in
`asyncio.to_thread`, a benchmark on its main thread), packing weights in parallel regions, so that thread
kept a pool of one worker; then the AsyncEngine's loop thread ran the steps with a pool of its own: four
OpenMP threads on a 2-core box. A 128-token prefill took 66-79 ms on a second thread against 43-51 ms on the
building thread; after the building thread released its pool, 48-49 ms on the second one (2026-12-07, Xeon
with AMX, bf16, 2 threads, serve_config.yaml's engine; the step of one prompt, medians of 8).

`release_openmp_pool()` frees the calling thread's pool (`omp_pause_resource_all(omp_pause_hard)`: its
workers exit). A thread that runs parallel regions again later gets a new pool, so the threads that build an
engine or do torch work beside its loop call it when done.
"""

from __future__ import annotations

import ctypes
import logging
import os
from functools import cache

logger = logging.getLogger(__name__)
OMP_PAUSE_HARD = 2  # omp_pause_resource_t: release the threads and their state


@cache
def _pause_function():
    """libgomp's omp_pause_resource_all (the copy torch loaded), or None where the process has no libgomp
    (another OpenMP runtime, or none)."""
    import torch

    candidates = [os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1"), "libgomp.so.1"]
    for path in candidates:
        try:
            library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:  # not loaded in this process: nothing of ours runs on it
            continue
        function = getattr(library, "omp_pause_resource_all", None)
        if function is not None:
            function.restype, function.argtypes = ctypes.c_int, [ctypes.c_int]
            return function
    return None


def release_openmp_pool() -> bool:
    """Frees the calling thread's OpenMP worker threads (they exit; a later parallel region on this thread
    starts new ones). False where there is no libgomp in the process or it refused (inside a parallel
    region)."""
    pause = _pause_function()
    if pause is None:
        return False
    if pause(OMP_PAUSE_HARD) != 0:
        logger.debug("omp_pause_resource_all refused on this thread")
        return False
    return True
