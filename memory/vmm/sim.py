"""Simulated VMM backend: the same bookkeeping and checks as the real ones, no bytes.

It lets the real pool and KV cache manager run at GPU scale (80 GB budgets, 2 MiB chunks,
128K contexts) on a laptop. Addresses are synthetic (never dereferenced); `as_tensor` returns a
tensor on the `meta` device, so shapes, dtypes and views work but no data exists.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memory.vmm.base import PhysicalChunk, VmmBackend

_ADDRESS_BASE = 1 << 44  # far from anything real; purely a label


class SimBackend(VmmBackend):
    """Bookkeeping-only backend. `granularity` defaults to 2 MiB (the CUDA one);
    `capacity_bytes` (optional) makes `create_chunk` fail with MemoryError past that much."""

    name = "sim"

    def __init__(self, granularity: int = 2 << 20, capacity_bytes: int | None = None,
                 device: str | torch.device = "meta") -> None:
        super().__init__(torch.device(device), granularity)
        self.capacity_bytes = capacity_bytes
        self.num_allocated_bytes = 0
        self._next_address = _ADDRESS_BASE
        self._next_offset = 0

    def _raw_reserve(self, num_bytes: int) -> int:
        address = self._next_address
        # Leave a guard gap so distinct reservations never touch.
        self._next_address += num_bytes + self.granularity
        return address

    def _raw_free_reservation(self, address: int, num_bytes: int) -> None:
        pass

    def _raw_create(self, num_bytes: int) -> tuple[int, object]:
        if self.capacity_bytes is not None and self.num_allocated_bytes + num_bytes > self.capacity_bytes:
            raise MemoryError(f"sim backend: {num_bytes} more bytes exceed capacity {self.capacity_bytes}")
        self.num_allocated_bytes += num_bytes
        offset = self._next_offset
        self._next_offset += num_bytes
        return offset, None

    def _raw_map(self, address: int, chunks: Sequence[PhysicalChunk]) -> None:
        pass

    def _raw_unmap(self, address: int, num_bytes: int, mappings: Sequence[tuple[int, PhysicalChunk]]) -> None:
        pass

    def _raw_release(self, chunk: PhysicalChunk) -> None:
        self.num_allocated_bytes -= chunk.num_bytes

    def _raw_close(self) -> None:
        pass

    def as_tensor(self, address: int, num_bytes: int) -> torch.Tensor:
        """A 1-D uint8 tensor of `num_bytes` on the meta device (no storage)."""
        self._check_open()
        self._find_reservation(address, num_bytes)
        return torch.empty(num_bytes, dtype=torch.uint8, device="meta")

    def physical_bytes(self) -> int:
        """Bytes that would be physically allocated now."""
        return self.num_allocated_bytes
