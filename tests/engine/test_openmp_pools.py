"""engine/openmp_pools.py: releasing a thread's OpenMP pool ends its worker threads, and AsyncEngine releases
the pool of the thread that built its engine, so the loop thread's pool is the process's only one (with two,
libgomp stops spinning its workers and every parallel region wakes a sleeping thread)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from engine import async_engine as async_engine_module
from engine.async_engine import AsyncEngine
from tests.engine.engine_helpers import tiny_engine

# in a fresh interpreter: no pool from an earlier test, and the thread count is this script's own
SCRIPT = textwrap.dedent("""
    import os, torch
    from engine.openmp_pools import release_openmp_pool

    def threads():
        return len(os.listdir("/proc/self/task"))

    torch.set_num_threads(2)
    torch.randn(1 << 22).exp()  # a parallel region on this thread: a pool with one worker
    with_pool = threads()
    assert release_openmp_pool()
    released = threads()
    torch.randn(1 << 22).exp()  # a later region on this thread starts a new pool
    again = threads()
    print(with_pool, released, again)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_release_ends_the_calling_threads_workers():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120, check=True)
    with_pool, released, again = map(int, done.stdout.split())
    assert released == with_pool - 1, done.stdout
    assert again == with_pool, done.stdout


def test_async_engine_releases_the_pool_of_the_thread_that_built_it(tiny_llama_dir, smollm2_tokenizer, monkeypatch):
    calls = []
    monkeypatch.setattr(async_engine_module, "release_openmp_pool", lambda: calls.append(threading.get_ident()))
    engine = tiny_engine(tiny_llama_dir, smollm2_tokenizer)
    AsyncEngine(engine)
    assert calls == [threading.get_ident()]
