"""The activation workspace: a virtual byte range whose pages come from the pool's `activations`
balloon. Before a step it inflates to what the step needs; between steps the KV cache may take pages
back (the balloon shrinks lazily, only when asked), so activations and KV trade memory every step.
"""

from __future__ import annotations

import torch

from memory.pool import ElasticPool
from memory.virtual_tensor import VirtualTensor

ACTIVATIONS_CLIENT = "activations"


class ActivationWorkspace:
    def __init__(self, pool: ElasticPool, max_bytes: int):
        self.pool = pool
        self.page_bytes = pool.chunk_bytes
        num_pages = -(-max_bytes // self.page_bytes)
        self.buffer = VirtualTensor(pool.backend, (num_pages * self.page_bytes,), torch.uint8, self.page_bytes)
        self.num_mapped = 0  # pages 0..num_mapped-1 are mapped
        self.floor = 0  # pages the running step uses; never given back
        pool.register(ACTIVATIONS_CLIENT, reclaim=self._reclaim, reclaimable=lambda: self.num_mapped - self.floor)

    def num_pages_for(self, num_bytes: int) -> int:
        return -(-num_bytes // self.page_bytes)

    def pages_charged_to_kv(self, num_pages: int) -> int:
        """Of the pages a step needs, how many the KV cache must leave for it. With a shared pool
        (no per-balloon limit) every workspace page competes with KV, including the ones the
        workspace holds now (KV may reclaim those between steps); with a fixed activation share
        (the static baseline) the share covers the step and KV owes nothing."""
        headroom = self.pool.policy.headroom(ACTIVATIONS_CLIENT, self.num_mapped)
        if headroom is None or num_pages > self.num_mapped + headroom:
            return num_pages
        return 0

    def acquire(self, num_bytes: int) -> torch.Tensor:
        """Maps enough pages for `num_bytes` (taking them from the pool) and pins them for the step."""
        needed = self.num_pages_for(num_bytes)
        if needed > self.buffer.num_pages:
            raise ValueError(f"step needs {num_bytes} B of activations, workspace max is {self.buffer.nbytes} B")
        if needed > self.num_mapped:
            chunks = self.pool.inflate(ACTIVATIONS_CLIENT, needed - self.num_mapped)
            self.buffer.map_pages(self.num_mapped, chunks)
            self.num_mapped = needed
        self.floor = needed
        return self.buffer.tensor[:num_bytes]

    def release(self) -> None:
        """The step is over: its pages may be reclaimed (they stay mapped until someone asks)."""
        self.floor = 0

    def give_back(self, num_pages: int) -> int:
        """Unmaps up to `num_pages` pages the running step does not use (for another activations
        user in the same step, such as the KV staging buffer: the pool never reclaims a balloon for
        itself). Returns how many went back to the pool."""
        return self._reclaim(num_pages)

    def _reclaim(self, num_pages: int) -> int:
        give = min(num_pages, self.num_mapped - self.floor)
        if give <= 0:
            return 0
        chunks = self.buffer.unmap_pages(self.num_mapped - give, give)
        self.num_mapped -= give
        self.pool.deflate(ACTIVATIONS_CLIENT, chunks)
        return give

    def close(self) -> None:
        self.floor = 0
        self._reclaim(self.num_mapped)
        self.buffer.close()
