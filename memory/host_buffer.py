"""HostBuffer: host RAM as the extension of a device pool (offloaded KV pages, parked weights).

One big host tensor cut into `page_bytes` slots; pinned when the device is CUDA so copies can be
asynchronous. Slots are handed out lowest-first. `HostSlots` is the slot bookkeeping alone (the
simulator's byte-less host buffer builds on it: loadtest/sim/executor.py).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

import torch


class HostBufferFull(MemoryError):
    """`allocate` asked for more slots than are free; nothing was allocated."""

    def __init__(self, requested: int, available: int) -> None:
        super().__init__(f"host buffer full: asked for {requested} slots, {available} free")
        self.requested = requested
        self.available = available


class HostSlots:
    """`capacity_bytes // page_bytes` slots of `page_bytes` bytes: which are free, which are taken.

    Contract: `allocate(n)` returns n distinct free slot ids or raises HostBufferFull; `free`
    takes back allocated slots (double free raises).
    """

    def __init__(self, capacity_bytes: int, page_bytes: int) -> None:
        if page_bytes <= 0:
            raise ValueError(f"page_bytes must be positive, got {page_bytes}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.page_bytes = int(page_bytes)
        self.num_slots = int(capacity_bytes) // self.page_bytes
        self.capacity_bytes = self.num_slots * self.page_bytes
        self._free_slots = list(range(self.num_slots))  # a sorted list is a valid heap
        self._is_allocated = bytearray(self.num_slots)

    @property
    def num_free(self) -> int:
        """Slots not allocated."""
        return len(self._free_slots)

    @property
    def used_bytes(self) -> int:
        """Bytes in allocated slots."""
        return (self.num_slots - len(self._free_slots)) * self.page_bytes

    def allocate(self, num_slots: int) -> list[int]:
        """Take `num_slots` free slots (lowest ids first). All or nothing."""
        if num_slots < 0:
            raise ValueError(f"num_slots must be >= 0, got {num_slots}")
        if num_slots > len(self._free_slots):
            raise HostBufferFull(num_slots, len(self._free_slots))
        slots = [heapq.heappop(self._free_slots) for _ in range(num_slots)]
        for slot in slots:
            self._is_allocated[slot] = 1
        return slots

    def free(self, slots: Iterable[int]) -> None:
        """Give allocated slots back. Checked all-or-nothing (unknown or free slots raise)."""
        slots = list(slots)
        if len(set(slots)) != len(slots):
            raise ValueError("free got the same slot twice")
        for slot in slots:
            self._check_allocated(slot)
        for slot in slots:
            self._is_allocated[slot] = 0
            heapq.heappush(self._free_slots, slot)

    def _check_allocated(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        if not self._is_allocated[slot]:
            raise ValueError(f"slot {slot} is not allocated")


class HostBuffer(HostSlots):
    """HostSlots backed by host memory for `device`: `view(slot)` is a uint8 tensor of page_bytes;
    `copy_in`/`copy_out` copy a whole page between a slot and a tensor of page_bytes bytes
    (non-blocking when the device is CUDA: synchronize before reading the destination).
    """

    def __init__(self, capacity_bytes: int, page_bytes: int, device: str | torch.device = "cpu") -> None:
        super().__init__(capacity_bytes, page_bytes)
        self.device = torch.device(device)
        self.is_pinned = self.device.type == "cuda"
        # torch.empty: pages are touched (and count in RSS) only when a slot is first written.
        self._storage = torch.empty(self.capacity_bytes, dtype=torch.uint8, pin_memory=self.is_pinned)

    def view(self, slot: int) -> torch.Tensor:
        """The slot's bytes as a 1-D uint8 host tensor (a view, not a copy)."""
        self._check_allocated(slot)
        start = slot * self.page_bytes
        return self._storage[start:start + self.page_bytes]

    def copy_in(self, slot: int, src: torch.Tensor) -> None:
        """Copy one page from `src` (any device/dtype, page_bytes bytes) into `slot`."""
        self.view(slot).copy_(self._as_bytes(src), non_blocking=self.is_pinned)

    def copy_in_bytes(self, slot: int, src: torch.Tensor, start: int, end: int) -> None:
        """Copy bytes [start, end) of a page `src` (page_bytes bytes) into the same bytes of `slot` (a few
        rows of a page: what a step wrote)."""
        if not 0 <= start <= end <= self.page_bytes:
            raise ValueError(f"bytes [{start}, {end}) are not in a {self.page_bytes}-byte page")
        self.view(slot)[start:end].copy_(self._as_bytes(src)[start:end], non_blocking=self.is_pinned)

    def copy_out(self, slot: int, dst: torch.Tensor) -> None:
        """Copy `slot` into `dst` (contiguous, page_bytes bytes, any device/dtype)."""
        if not dst.is_contiguous():
            raise ValueError("copy_out needs a contiguous destination")
        self._as_bytes(dst).copy_(self.view(slot), non_blocking=self.is_pinned)

    def _as_bytes(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.numel() * tensor.element_size() != self.page_bytes:
            raise ValueError(f"tensor of {tensor.numel() * tensor.element_size()} bytes is not one "
                             f"{self.page_bytes}-byte page")
        return tensor.reshape(-1).view(torch.uint8)
