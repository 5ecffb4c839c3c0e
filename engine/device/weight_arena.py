"""Weights placed in the pool's `weights` balloon: a bump allocator over one virtual range."""

from __future__ import annotations

import torch

from memory.pool import ElasticPool
from memory.virtual_tensor import VirtualTensor

WEIGHTS_CLIENT = "weights"
_ALIGN = 64


class WeightArena:
    def __init__(self, pool: ElasticPool, max_bytes: int):
        self.pool = pool
        self.page_bytes = pool.chunk_bytes
        num_pages = -(-max_bytes // self.page_bytes)
        self.buffer = VirtualTensor(pool.backend, (num_pages * self.page_bytes,), torch.uint8, self.page_bytes)
        self.num_mapped = 0
        self.num_bytes = 0
        pool.register(WEIGHTS_CLIENT)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copies `tensor` into pool memory; returns the pool-backed tensor (same shape and dtype)."""
        tensor = tensor.contiguous()
        start = -(-self.num_bytes // _ALIGN) * _ALIGN
        end = start + tensor.numel() * tensor.element_size()
        needed = -(-end // self.page_bytes)
        if needed > self.num_mapped:
            chunks = self.pool.inflate(WEIGHTS_CLIENT, needed - self.num_mapped)
            self.buffer.map_pages(self.num_mapped, chunks)
            self.num_mapped = needed
        placed = self.buffer.tensor[start:end].view(tensor.dtype).view(tensor.shape)
        placed.copy_(tensor)
        self.num_bytes = end
        return placed

    def close(self) -> None:
        if self.num_mapped:
            self.pool.deflate(WEIGHTS_CLIENT, self.buffer.unmap_pages(0, self.num_mapped))
            self.num_mapped = 0
        self.buffer.close()
