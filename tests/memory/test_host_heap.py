"""memory/host_heap.py: freed heap blocks that glibc keeps go back to the OS (in a fresh process: a clean heap)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import ctypes, sys
from memory.host_heap import trim_host_heap

def heap_kb():
    total, inside = 0, False
    for line in open('/proc/self/smaps'):
        if line[0] in '0123456789abcdef' and '-' in line.split()[0]:
            inside = line.rstrip().endswith('[heap]')
        elif inside and line.startswith('Rss:'):
            total += int(line.split()[1])
    return total

libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
size = 1 << 20  # 1 MiB blocks, as a weight load's (under the mmap threshold once it has risen)
libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD: 4 MiB, so the blocks come from the heap as after a load
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: free() alone does not trim the top
blocks = [libc.malloc(size) for _ in range(256)]
for block in blocks:
    libc.memset(block, 1, size)
for block in blocks[::2]:
    libc.free(block)  # every other one: holes that free() cannot give back
before = heap_kb()
ok = trim_host_heap()
print(ok, before, heap_kb())
"""


def test_trim_gives_the_heaps_free_pages_back():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    ok, before_kb, after_kb = done.stdout.split()
    assert ok == "True"
    assert int(before_kb) > 250 << 10  # 256 MiB touched, half of it freed but still resident
    assert int(before_kb) - int(after_kb) > 100 << 10  # most of the freed 128 MiB went back
