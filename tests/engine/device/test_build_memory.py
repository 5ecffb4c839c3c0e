"""Building an engine leaves no load garbage in the process: the fp32 load's transient host tensors (the GGUF
dequantized, weights packed into panels) are freed and the C heap trimmed (engine/device/rank.py,
memory/host_heap.py). Before the trim SmolLM2's fp32 engine held 1,060 MB of [heap] RSS beside its 517 MB pool."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from engine.config import EngineConfig
from engine.core.engine import LLMEngine

engine = LLMEngine(EngineConfig(dtype='float32', num_threads=1, max_model_len=256, device_memory_bytes=1 << 30,
                                host_buffer_bytes=64 << 20))
heap = pool = 0
kind = None
for line in open('/proc/self/smaps'):
    if line[0] in '0123456789abcdef' and '-' in line.split()[0]:
        kind = 'heap' if line.rstrip().endswith('[heap]') else 'pool' if 'elastic-serve-pool' in line else None
    elif kind and line.startswith('Rss:'):
        heap += int(line.split()[1]) * (kind == 'heap')
        pool += int(line.split()[1]) * (kind == 'pool')
print(heap >> 10, pool >> 10)
"""


def test_an_fp32_engine_keeps_no_load_garbage_on_the_heap():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True)
    heap_mb, pool_mb = map(int, done.stdout.split()[-2:])
    assert pool_mb > 400  # the weights are in the pool (fp32 SmolLM2: ~520 MB)
    assert heap_mb < 300, f"[heap] {heap_mb} MB after the build (pool {pool_mb} MB)"
