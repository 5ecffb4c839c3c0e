"""The VMM backend interface: reserve a virtual range, create physical chunks, map, unmap, release.

`VmmBackend` keeps the bookkeeping common to every backend (which ranges are reserved, which chunk
is mapped where, how many places map each chunk) and refuses detectable misuse with Python
exceptions *before* anything reaches the OS or driver:

* `ValueError`: a size or address not a multiple of `granularity`, a range outside every
  reservation, mapping onto a page that is already mapped, unmapping part of a mapping, releasing a
  chunk that is still mapped, releasing a chunk twice, a chunk of another backend;
* `BackendClosed`: any call after `close()`.

Subclasses implement the `_raw_*` primitives and only ever see valid requests.
"""

from __future__ import annotations

import bisect
import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class BackendUnavailable(RuntimeError):
    """The backend cannot run on this machine (no driver, no library, wrong OS)."""


class BackendClosed(RuntimeError):
    """The backend (or an object built on it) was used after `close()`."""


@dataclass(eq=False)
class PhysicalChunk:
    """One physical allocation of `num_bytes` bytes.

    `num_mappings` is kept by the backend: +1 per `map`, -1 per `unmap` of a place mapping it.
    `owner` is the pool client holding it (kept by `ElasticPool`). `physical_offset` orders chunks
    by physical locality: chunks whose offsets are adjacent can be mapped with one call (host).
    `handle` is the backend's own object (memfd offset, CUmemGenericAllocationHandle, None).
    """

    chunk_id: int
    num_bytes: int
    physical_offset: int = 0
    handle: object = None
    num_mappings: int = 0
    owner: str | None = None
    is_released: bool = False
    backend_key: int = field(default=0, repr=False)

    def __hash__(self) -> int:
        return hash((self.backend_key, self.chunk_id))


@dataclass
class _Reservation:
    start: int
    num_bytes: int
    mapping_starts: list[int] = field(default_factory=list)  # sorted
    mappings: dict[int, PhysicalChunk] = field(default_factory=dict)  # start address -> chunk

    @property
    def end(self) -> int:
        return self.start + self.num_bytes


_BACKEND_KEYS = itertools.count(1)


class VmmBackend(ABC):
    """Five operations on one device's memory: reserve, create_chunk, map, unmap, release_chunk.

    Contract: sizes, addresses and offsets are multiples of `granularity`; `map` maps a whole chunk
    at an address inside a reservation whose pages there are unmapped; unmapped pages of a
    reservation read as zeros (host) or scratch (cuda) and never fault on read; `release_chunk`
    refuses a chunk that is still mapped; `as_tensor` is a zero-copy 1-D uint8 view.
    """

    name: str = "abstract"

    def __init__(self, device: torch.device, granularity: int) -> None:
        if granularity <= 0:
            raise ValueError(f"granularity must be positive, got {granularity}")
        self.device = torch.device(device)
        self.granularity = int(granularity)
        self.is_closed = False
        self._key = next(_BACKEND_KEYS)
        self._chunk_ids = itertools.count()
        self._reservation_starts: list[int] = []  # sorted
        self._reservations: dict[int, _Reservation] = {}
        self._live_chunks: dict[int, PhysicalChunk] = {}

    # ---- primitives the concrete backends implement -------------------------------------------
    @abstractmethod
    def _raw_reserve(self, num_bytes: int) -> int: ...

    @abstractmethod
    def _raw_free_reservation(self, address: int, num_bytes: int) -> None: ...

    @abstractmethod
    def _raw_create(self, num_bytes: int) -> tuple[int, object]:
        """Allocate physical memory; return (physical_offset, handle)."""

    @abstractmethod
    def _raw_map(self, address: int, chunks: Sequence[PhysicalChunk]) -> None:
        """Map `chunks` back to back starting at `address` (over unmapped pages)."""

    @abstractmethod
    def _raw_unmap(self, address: int, num_bytes: int, mappings: Sequence[tuple[int, PhysicalChunk]]) -> None:
        """Put the unmapped (zero/scratch) backing back over `mappings` ((address, chunk) pairs, in
        address order), which span [address, address+num_bytes) possibly with holes between them."""

    @abstractmethod
    def _raw_release(self, chunk: PhysicalChunk) -> None: ...

    @abstractmethod
    def _raw_close(self) -> None: ...

    @abstractmethod
    def as_tensor(self, address: int, num_bytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor viewing `num_bytes` at `address` without copying."""

    def synchronize(self) -> None:  # noqa: B027 - host and sim have nothing to wait for
        """Wait until the device has finished all work touching this backend's memory."""

    # ---- checked public operations -------------------------------------------------------------
    def reserve(self, num_bytes: int) -> int:
        """Reserve a virtual range of `num_bytes` (multiple of granularity); returns its address.
        Every page starts unmapped (reads zeros/scratch)."""
        self._check_open()
        self._check_aligned("reservation size", num_bytes, positive=True)
        address = self._raw_reserve(num_bytes)
        bisect.insort(self._reservation_starts, address)
        self._reservations[address] = _Reservation(address, num_bytes)
        return address

    def free_reservation(self, address: int, num_bytes: int) -> None:
        """Give back a whole reservation; its pages must all be unmapped."""
        self._check_open()
        reservation = self._reservations.get(address)
        if reservation is None or reservation.num_bytes != num_bytes:
            raise ValueError(f"no reservation of {num_bytes} bytes at {address:#x}")
        if reservation.mappings:
            raise ValueError(f"reservation at {address:#x} still has {len(reservation.mappings)} mappings")
        self._raw_free_reservation(address, num_bytes)
        self._reservation_starts.remove(address)
        del self._reservations[address]

    def create_chunk(self, num_bytes: int) -> PhysicalChunk:
        """Allocate one physical chunk of `num_bytes` (multiple of granularity), unmapped, no owner."""
        self._check_open()
        self._check_aligned("chunk size", num_bytes, positive=True)
        offset, handle = self._raw_create(num_bytes)
        chunk = PhysicalChunk(next(self._chunk_ids), num_bytes, offset, handle, backend_key=self._key)
        self._live_chunks[chunk.chunk_id] = chunk
        return chunk

    def map(self, address: int, chunk: PhysicalChunk) -> None:
        """Map the whole `chunk` at `address`; the pages there must be unmapped. num_mappings += 1."""
        self.map_run(address, [chunk])

    def map_run(self, address: int, chunks: Sequence[PhysicalChunk]) -> None:
        """Map `chunks` back to back from `address` (one call per physically contiguous run where
        the backend can). All-or-nothing with respect to the checks."""
        self._check_open()
        if not chunks:
            return
        for chunk in chunks:
            self._check_live(chunk)
        num_bytes = sum(c.num_bytes for c in chunks)
        self._check_aligned("address", address)
        reservation = self._find_reservation(address, num_bytes)
        index = bisect.bisect_left(reservation.mapping_starts, address)
        if index > 0:
            previous = reservation.mapping_starts[index - 1]
            if previous + reservation.mappings[previous].num_bytes > address:
                raise ValueError(f"{address:#x} is already mapped; unmap it first")
        starts = reservation.mapping_starts
        if index < len(starts) and starts[index] < address + num_bytes:
            raise ValueError(f"[{address:#x}, +{num_bytes}) overlaps a mapped page; unmap it first")
        self._raw_map(address, chunks)
        place = address
        new_starts = []
        for chunk in chunks:
            reservation.mappings[place] = chunk
            new_starts.append(place)
            chunk.num_mappings += 1
            place += chunk.num_bytes
        reservation.mapping_starts[index:index] = new_starts

    def unmap(self, address: int, num_bytes: int) -> list[PhysicalChunk]:
        """Unmap every mapping inside [address, address+num_bytes) (whole mappings only; holes are
        fine) and return their chunks in address order, each with num_mappings -= 1."""
        self._check_open()
        self._check_aligned("address", address)
        self._check_aligned("size", num_bytes, positive=True)
        reservation = self._find_reservation(address, num_bytes)
        starts = reservation.mapping_starts
        first = bisect.bisect_left(starts, address)
        last = bisect.bisect_left(starts, address + num_bytes)
        if first > 0 and starts[first - 1] + reservation.mappings[starts[first - 1]].num_bytes > address:
            raise ValueError(f"{address:#x} cuts a mapping in two; unmap whole mappings")
        end = address + num_bytes
        if last > first and starts[last - 1] + reservation.mappings[starts[last - 1]].num_bytes > end:
            raise ValueError(f"[{address:#x}, +{num_bytes}) cuts a mapping in two; unmap whole mappings")
        if last == first:
            return []
        self.synchronize()
        # Cover exactly the mapped span so unmapped neighbours are not touched.
        span_start = starts[first]
        span_end = starts[last - 1] + reservation.mappings[starts[last - 1]].num_bytes
        mappings = [(start, reservation.mappings[start]) for start in starts[first:last]]
        self._raw_unmap(span_start, span_end - span_start, mappings)
        chunks = [reservation.mappings.pop(start) for start in starts[first:last]]
        del starts[first:last]
        for chunk in chunks:
            chunk.num_mappings -= 1
        return chunks

    def release_chunk(self, chunk: PhysicalChunk) -> None:
        """Return the chunk's memory to the OS/driver. Refuses a mapped or already released chunk."""
        self._check_open()
        self._check_live(chunk)
        if chunk.num_mappings:
            raise ValueError(f"chunk {chunk.chunk_id} is still mapped at {chunk.num_mappings} places")
        self._raw_release(chunk)
        chunk.is_released = True
        del self._live_chunks[chunk.chunk_id]

    def chunk_at(self, address: int) -> PhysicalChunk | None:
        """The chunk whose mapping starts at `address`, or None."""
        reservation = self._find_reservation(address, 0)
        return reservation.mappings.get(address)

    @property
    def num_live_chunks(self) -> int:
        """Chunks created and not yet released."""
        return len(self._live_chunks)

    @property
    def num_reservations(self) -> int:
        """Reservations not yet freed."""
        return len(self._reservations)

    def close(self) -> None:
        """Unmap everything, free all reservations and chunks. Tensors from `as_tensor` become
        invalid (touching them afterwards is undefined: it may fault). Idempotent."""
        if self.is_closed:
            return
        self.synchronize()
        for reservation in list(self._reservations.values()):
            if reservation.mappings:
                self.unmap(reservation.start, reservation.num_bytes)
            self.free_reservation(reservation.start, reservation.num_bytes)
        for chunk in list(self._live_chunks.values()):
            self.release_chunk(chunk)
        self._raw_close()
        self.is_closed = True

    def __enter__(self) -> VmmBackend:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- helpers -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.is_closed:
            raise BackendClosed(f"{self.name} backend used after close()")

    def _check_aligned(self, what: str, value: int, positive: bool = False) -> None:
        if positive and value <= 0:
            raise ValueError(f"{what} must be positive, got {value}")
        if value % self.granularity:
            raise ValueError(f"{what} {value:#x} is not a multiple of the granularity {self.granularity}")

    def _check_live(self, chunk: PhysicalChunk) -> None:
        if chunk.backend_key != self._key:
            raise ValueError(f"chunk {chunk.chunk_id} belongs to another backend")
        if chunk.is_released or chunk.chunk_id not in self._live_chunks:
            raise ValueError(f"chunk {chunk.chunk_id} was already released")

    def _find_reservation(self, address: int, num_bytes: int) -> _Reservation:
        index = bisect.bisect_right(self._reservation_starts, address) - 1
        if index >= 0:
            reservation = self._reservations[self._reservation_starts[index]]
            if address + num_bytes <= reservation.end and address < reservation.end:
                return reservation
        raise ValueError(f"[{address:#x}, +{num_bytes}) is not inside a reservation")
