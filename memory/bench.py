"""`python -m memory.bench`: latency of the VMM operations and pool throughput, per backend.

Per chunk (µs, median and p90): create, map (one page at a time), map run (`map_pages` of many
physically contiguous chunks, per chunk), move (remap to another page, no copy), unmap, release.
Pool throughput (chunks/s and GB/s): inflate that creates chunks (cold), inflate from the free
list (warm), deflate, and the KV-style cycle inflate + map_pages + unmap_pages + deflate.
Backends: host and sim always, cuda when a GPU and cuda-python are present. Numbers are printed,
never asserted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from memory.pool import ElasticPool
from memory.virtual_tensor import VirtualTensor
from memory.vmm.base import BackendUnavailable, VmmBackend
from memory.vmm.registry import create_backend

CHUNK_SIZES = (48 << 10, 2 << 20)
_clock = time.perf_counter_ns


@dataclass(frozen=True)
class LatencyRow:
    """Per-chunk latency of one operation (µs)."""

    backend: str
    chunk_bytes: int
    operation: str
    median_us: float
    p90_us: float

    def __post_init__(self) -> None:
        if self.median_us < 0 or self.p90_us < 0:
            raise ValueError("latencies are non-negative")


@dataclass(frozen=True)
class ThroughputRow:
    """Pool throughput of one phase."""

    backend: str
    chunk_bytes: int
    phase: str
    chunks_per_second: float

    @property
    def gigabytes_per_second(self) -> float:
        """Memory handed over per second (bookkeeping: no bytes are copied)."""
        return self.chunks_per_second * self.chunk_bytes / 1e9


def _percentile(samples: Sequence[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _timed(action: Callable[[], object]) -> float:
    start = _clock()
    action()
    return (_clock() - start) / 1000.0


def _latency(backend: VmmBackend, chunk_bytes: int, num_chunks: int) -> list[LatencyRow]:
    samples: dict[str, list[float]] = {name: [] for name in
                                       ("create", "map", "map run", "move", "unmap", "release")}
    vt = VirtualTensor(backend, (2 * num_chunks * chunk_bytes,), torch.uint8, chunk_bytes)
    chunks = []
    for _ in range(num_chunks):
        start = _clock()
        chunks.append(backend.create_chunk(chunk_bytes))
        samples["create"].append((_clock() - start) / 1000.0)
    for index, chunk in enumerate(chunks):
        samples["map"].append(_timed(lambda i=index, c=chunk: vt.map_page(i, c)))
    for index in range(num_chunks):
        samples["move"].append(_timed(lambda i=index: vt.move_page(i, num_chunks + i)))
    for index in range(num_chunks):
        samples["unmap"].append(_timed(lambda i=index: vt.unmap_page(num_chunks + i)))
    for _ in range(5):
        elapsed = _timed(lambda: vt.map_pages(0, chunks))
        samples["map run"].append(elapsed / num_chunks)
        vt.unmap_pages(0, num_chunks)
    for chunk in chunks:
        samples["release"].append(_timed(lambda c=chunk: backend.release_chunk(c)))
    vt.close()
    return [LatencyRow(backend.name, chunk_bytes, name, statistics.median(values), _percentile(values, 0.9))
            for name, values in samples.items()]


def _throughput(backend: VmmBackend, chunk_bytes: int, num_chunks: int, rounds: int) -> list[ThroughputRow]:
    pool = ElasticPool(backend, num_chunks * chunk_bytes, chunk_bytes)
    pool.register("kv")
    vt = VirtualTensor(backend, (num_chunks * chunk_bytes,), torch.uint8, chunk_bytes)
    rows = []
    chunks: list = []
    cold = _timed(lambda: chunks.extend(pool.inflate("kv", num_chunks)))
    rows.append(ThroughputRow(backend.name, chunk_bytes, "inflate (cold: create)", num_chunks / cold * 1e6))
    warm, deflate, cycle = [], [], []
    for _ in range(rounds):
        deflate.append(_timed(lambda: pool.deflate("kv", chunks)))
        chunks.clear()
        warm.append(_timed(lambda: chunks.extend(pool.inflate("kv", num_chunks))))
    pool.deflate("kv", chunks)
    chunks.clear()

    def kv_cycle() -> None:
        taken = pool.inflate("kv", num_chunks)
        vt.map_pages(0, taken)
        pool.deflate("kv", vt.unmap_pages(0, num_chunks))

    for _ in range(rounds):
        cycle.append(_timed(kv_cycle))
    for phase, values in (("inflate (warm: free list)", warm), ("deflate", deflate),
                          ("inflate+map+unmap+deflate", cycle)):
        rate = num_chunks / statistics.median(values) * 1e6
        rows.append(ThroughputRow(backend.name, chunk_bytes, phase, rate))
    vt.close()
    pool.close()
    return rows


def run(backend_names: Sequence[str], num_chunks: dict[int, int], rounds: int
        ) -> tuple[list[LatencyRow], list[ThroughputRow], list[str]]:
    """Measure every backend at every chunk size; returns the rows and the skipped backends."""
    latencies: list[LatencyRow] = []
    throughputs: list[ThroughputRow] = []
    skipped = []
    for name in backend_names:
        try:
            # sim models bookkeeping only: give it the host page so both chunk sizes are measured.
            backend = create_backend(name, **({"granularity": 4096} if name == "sim" else {}))
        except BackendUnavailable as error:
            skipped.append(f"{name}: {error}")
            continue
        try:
            for chunk_bytes, count in num_chunks.items():
                if chunk_bytes % backend.granularity:
                    skipped.append(f"{name} @ {_size(chunk_bytes)}: granularity is {backend.granularity}")
                    continue
                latencies += _latency(backend, chunk_bytes, count)
                throughputs += _throughput(backend, chunk_bytes, count, rounds)
        finally:
            backend.close()
    return latencies, throughputs, skipped


def _size(num_bytes: int) -> str:
    return f"{num_bytes >> 20} MiB" if num_bytes >= 1 << 20 else f"{num_bytes >> 10} KiB"


def format_tables(latencies: Sequence[LatencyRow], throughputs: Sequence[ThroughputRow]) -> str:
    """The two tables as aligned text."""
    lines = [f"{'backend':8} {'chunk':>7} {'operation':10} {'median µs':>10} {'p90 µs':>10}"]
    lines += [f"{r.backend:8} {_size(r.chunk_bytes):>7} {r.operation:10} {r.median_us:10.2f} {r.p90_us:10.2f}"
              for r in latencies]
    lines += ["", f"{'backend':8} {'chunk':>7} {'pool phase':27} {'chunks/s':>12} {'GB/s':>9}"]
    lines += [f"{r.backend:8} {_size(r.chunk_bytes):>7} {r.phase:27} {r.chunks_per_second:12,.0f} "
              f"{r.gigabytes_per_second:9.2f}" for r in throughputs]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry: measure and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="host,sim,cuda", help="comma-separated backend names")
    parser.add_argument("--chunks-small", type=int, default=1024, help="chunks measured at 48 KiB")
    parser.add_argument("--chunks-large", type=int, default=128, help="chunks measured at 2 MiB")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    counts = dict(zip(CHUNK_SIZES, (args.chunks_small, args.chunks_large), strict=True))
    latencies, throughputs, skipped = run(args.backends.split(","), counts, args.rounds)
    print(format_tables(latencies, throughputs))
    for line in skipped:
        print(f"skipped {line}")


if __name__ == "__main__":
    main()
