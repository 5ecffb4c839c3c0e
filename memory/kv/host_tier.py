"""The in-place host tier for layer-wise offloading on the `host` VMM backend.

Where the "device" is host RAM too (the CPU backend), an offloaded page need not be copied anywhere
to be read: it can be a chunk of the backend's own memfd that lives *outside* the pool's budget and
stays mapped at the request's page of the layer's virtual tensor, so attention reads it in place and a
step stages nothing. This tier lends such chunks, up to `capacity_chunks`; they carry
`owner == HOST_TIER` so the KV manager tells them from pool chunks (and never gives them to the pool).
On a GPU the host is not addressable by kernels: there the staged `copy` path is the one that runs.
"""

from __future__ import annotations

from memory.host_buffer import HostBufferFull
from memory.vmm.base import PhysicalChunk, VmmBackend

HOST_TIER = "host-tier"


class HostChunkTier:
    def __init__(self, backend: VmmBackend, page_bytes: int, capacity_chunks: int) -> None:
        self.backend = backend
        self.page_bytes = page_bytes
        self.capacity_chunks = capacity_chunks
        self._free: list[PhysicalChunk] = []
        self._num_created = 0
        self.num_used = 0

    @property
    def num_free(self) -> int:
        return self.capacity_chunks - self.num_used

    def allocate(self, num_chunks: int) -> list[PhysicalChunk]:
        """`num_chunks` chunks (reused first, else created), all or nothing."""
        if num_chunks > self.num_free:
            raise HostBufferFull(num_chunks, self.num_free)
        chunks = [self._free.pop() if self._free else self._create() for _ in range(num_chunks)]
        self.num_used += num_chunks
        return chunks

    def release(self, chunks: list[PhysicalChunk]) -> None:
        """Takes back unmapped chunks (kept for reuse: creating one costs a memfd extension)."""
        for chunk in chunks:
            if chunk.owner != HOST_TIER or chunk.num_mappings:
                raise ValueError(f"chunk {chunk.chunk_id} is not an unmapped host-tier chunk")
        self._free.extend(chunks)
        self.num_used -= len(chunks)

    def _create(self) -> PhysicalChunk:
        chunk = self.backend.create_chunk(self.page_bytes)
        chunk.owner = HOST_TIER
        self._num_created += 1
        return chunk

    def close(self) -> None:
        if self.backend.is_closed:
            return
        for chunk in self._free:
            self.backend.release_chunk(chunk)
        self._free.clear()
