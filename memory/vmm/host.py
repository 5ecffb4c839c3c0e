"""Host (CPU) VMM backend: memfd chunks mapped into reserved address ranges with mmap.

Physical memory is ONE memfd per backend instance; a chunk is a byte offset into it (grown with
ftruncate; sparse, so growing costs nothing). Released offsets are reused lowest-first, so the
chunks a request takes one after another tend to sit next to each other in the memfd: mapping
them at consecutive virtual pages gives the kernel adjacent VMAs with contiguous file offsets,
which it merges into one. That matters because a process may hold at most
`vm.max_map_count` (65,530 by default) mappings.

* map:     mmap(addr, size, PROT_READ|PROT_WRITE, MAP_FIXED|MAP_SHARED, memfd, offset)
* release: fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE): the pages go back to the OS
* create:  fallocate(mode 0) on the chunk's range, so the chunk is physically allocated (and
           zeroed) when created, like cuMemCreate, and its first use does not allocate.

Design decision, the "scratch" of unmapped pages: a reservation is ONE anonymous private
read-only mapping, mmap(NULL, n, PROT_READ, MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE), and unmap
puts that same kind of mapping back with MAP_FIXED. So every unmapped page reads as zeros (the
kernel's shared zero page), never faults on read, uses no RAM, and adjacent unmapped pages merge
into one kernel mapping. The alternative the design sketch mentions, one shared scratch chunk
mapped at every hole, costs one kernel mapping per hole and would exhaust the 65,530-mapping limit
for large reservations; it would also let stray writes scribble on shared memory. The engine relies
on unmapped pages reading as finite zeros, and that holds here.

A *write* to an unmapped page hits the read-only zero mapping and the process dies with SIGSEGV:
the fault happens inside a torch kernel, where Python cannot catch it. Misuse the backend can
see (mapping outside a reservation, misalignment, double mapping, releasing a mapped chunk,
double free, use after close) is refused with a Python exception by `VmmBackend`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import heapq
import mmap
import os
from collections.abc import Sequence

import torch

from memory.vmm.base import BackendUnavailable, PhysicalChunk, VmmBackend

PROT_READ = 0x1
PROT_WRITE = 0x2
MAP_SHARED = 0x01
MAP_PRIVATE = 0x02
MAP_FIXED = 0x10
MAP_ANONYMOUS = 0x20
MAP_NORESERVE = 0x4000
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_ZERO_PROT = PROT_READ
_ZERO_FLAGS = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE

_libc = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        if not hasattr(os, "memfd_create"):
            raise BackendUnavailable("the host backend needs Linux (os.memfd_create)")
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_int64]
        libc.mmap.restype = ctypes.c_void_p
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.munmap.restype = ctypes.c_int
        libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        libc.fallocate.restype = ctypes.c_int
        _libc = libc
    return _libc


_MAP_FAILED = ctypes.c_void_p(-1).value


def _raise_errno(call: str) -> None:
    code = ctypes.get_errno()
    raise OSError(code, f"{call}: {os.strerror(code)}")


class HostBackend(VmmBackend):
    """VMM on Linux host memory (see the module docstring for the mapping scheme).

    `granularity` defaults to the OS page size (4 KiB); chunk sizes are multiples of it.
    """

    name = "host"

    def __init__(self, granularity: int | None = None, prefault: bool = True) -> None:
        page = mmap.PAGESIZE
        granularity = page if granularity is None else int(granularity)
        if granularity % page:
            raise ValueError(f"host granularity must be a multiple of the page size {page}")
        super().__init__(torch.device("cpu"), granularity)
        self._libc = _load_libc()
        self._memfd = os.memfd_create("elastic-serve-pool", os.MFD_CLOEXEC)
        self._file_bytes = 0  # ftruncate'd size of the memfd
        self._next_offset = 0  # offsets below this were handed out at least once
        self._free_offsets: dict[int, list[int]] = {}  # chunk size -> min-heap of reusable offsets
        self.is_prefault = prefault

    # ---- primitives ----------------------------------------------------------------------------
    def _mmap(self, address: int | None, num_bytes: int, prot: int, flags: int, fd: int, offset: int) -> int:
        result = self._libc.mmap(address, num_bytes, prot, flags, fd, offset)
        if result is None or result == _MAP_FAILED:
            _raise_errno("mmap")
        return int(result)

    def _raw_reserve(self, num_bytes: int) -> int:
        address = self._mmap(None, num_bytes, _ZERO_PROT, _ZERO_FLAGS, -1, 0)
        if address % self.granularity:
            # mmap aligns to the OS page only; over-reserve and trim to honour a larger granularity.
            self._libc.munmap(address, num_bytes)
            padded = self._mmap(None, num_bytes + self.granularity, _ZERO_PROT, _ZERO_FLAGS, -1, 0)
            address = -(-padded // self.granularity) * self.granularity
            if address > padded:
                self._libc.munmap(padded, address - padded)
            tail = padded + num_bytes + self.granularity - (address + num_bytes)
            if tail:
                self._libc.munmap(address + num_bytes, tail)
        return address

    def _raw_free_reservation(self, address: int, num_bytes: int) -> None:
        if self._libc.munmap(address, num_bytes) != 0:
            _raise_errno("munmap")

    def _raw_create(self, num_bytes: int) -> tuple[int, object]:
        heap = self._free_offsets.get(num_bytes)
        if heap:
            offset = heapq.heappop(heap)
        else:
            offset = self._next_offset
            self._next_offset += num_bytes
            if self._next_offset > self._file_bytes:
                # Sparse file: growing it reserves nothing, so grow geometrically.
                self._file_bytes = max(self._next_offset, 2 * self._file_bytes)
                os.ftruncate(self._memfd, self._file_bytes)
        if self.is_prefault:
            self._fallocate(0, offset, num_bytes)
        return offset, offset

    def _raw_map(self, address: int, chunks: Sequence[PhysicalChunk]) -> None:
        # One mmap per run of chunks whose memfd offsets are contiguous.
        run_address, run_offset, run_bytes = address, chunks[0].physical_offset, 0
        for chunk in chunks:
            if chunk.physical_offset != run_offset + run_bytes:
                self._map_one(run_address, run_offset, run_bytes)
                run_address, run_offset, run_bytes = run_address + run_bytes, chunk.physical_offset, 0
            run_bytes += chunk.num_bytes
        self._map_one(run_address, run_offset, run_bytes)

    def _map_one(self, address: int, offset: int, num_bytes: int) -> None:
        self._mmap(address, num_bytes, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_SHARED, self._memfd, offset)

    def _raw_unmap(self, address: int, num_bytes: int, mappings: Sequence[tuple[int, PhysicalChunk]]) -> None:
        self._mmap(address, num_bytes, _ZERO_PROT, _ZERO_FLAGS | MAP_FIXED, -1, 0)

    def _raw_release(self, chunk: PhysicalChunk) -> None:
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, chunk.physical_offset, chunk.num_bytes)
        heapq.heappush(self._free_offsets.setdefault(chunk.num_bytes, []), chunk.physical_offset)

    def _raw_close(self) -> None:
        os.close(self._memfd)
        self._memfd = -1

    def _fallocate(self, mode: int, offset: int, num_bytes: int) -> None:
        if self._libc.fallocate(self._memfd, mode, offset, num_bytes) != 0:
            code = ctypes.get_errno()
            if code == errno.ENOSPC:
                raise MemoryError(f"host backend: no memory for {num_bytes} bytes (fallocate ENOSPC)")
            _raise_errno("fallocate")

    # ---- views ---------------------------------------------------------------------------------
    def as_tensor(self, address: int, num_bytes: int) -> torch.Tensor:
        """Zero-copy uint8 CPU tensor over [address, address+num_bytes) (data_ptr() == address)."""
        self._check_open()
        if num_bytes <= 0:
            raise ValueError(f"num_bytes must be positive, got {num_bytes}")
        self._find_reservation(address, num_bytes)
        buffer = (ctypes.c_char * num_bytes).from_address(address)
        return torch.frombuffer(buffer, dtype=torch.uint8)

    # ---- introspection -------------------------------------------------------------------------
    def physical_bytes(self) -> int:
        """Bytes of RAM the memfd holds now (allocated blocks), whether mapped or not."""
        self._check_open()
        return os.fstat(self._memfd).st_blocks * 512

    @property
    def memfd(self) -> int:
        """The backing memfd (for tests and diagnostics)."""
        return self._memfd
