"""Swap: a preempted request's KV pages go to the host buffer and come back whole (the scheduler's last resort).

`KVSwap` is mixed into `KVCacheManager` (it provides requests, slots, blocks, layout, prefix, pool, spec and the
block helpers `_release`, `_block_of`, `_release_slot`; `LayerResidency` provides `_swapped_block_slots`). A
partly offloaded request's host pages are taken over by the swap; swap-in brings the request back with every
layer on the device.
"""

from __future__ import annotations

from memory.kv.residency import DEVICE, HOST


class KVSwap:
    def chunks_freed_by_swap(self, request_id: str) -> int:
        """Device chunks swapping the request out gives back (its pages no other request shares)."""
        state = self.requests[request_id]
        return sum(1 for pages in state.blocks for b in pages if b and b.ref_count == 1
                   for chunk in b.chunks if chunk is not None)

    def can_swap_out(self, request_id: str) -> bool:
        state = self.requests[request_id]
        needed = sum(1 for pages in state.blocks for b in pages if b for chunk in b.chunks if chunk is not None)
        return self.host_buffer is not None and needed <= self.host_buffer.num_free

    def swap_out(self, request_id: str) -> int:
        """Copies the request's pages to the host buffer and frees them on the device. Returns bytes."""
        state = self.requests[request_id]
        if state.is_swapped:  # its host slots would be dropped, and a later free could not account for them
            raise RuntimeError(f"{request_id} is already swapped out")
        slot = self.slot_of(request_id)
        self.prefix.current_release = state.release
        state.host_slots = []
        num_bytes = 0
        for group, pages in enumerate(state.blocks):
            host_pages: list[list[int] | None] = []
            for page, block in enumerate(pages):
                if block is None:
                    host_pages.append(None)
                    continue
                device = [chunk for chunk in block.chunks if chunk is not None]
                copied = self.host_buffer.allocate(len(device))
                self.layout.copy_block_to_host(slot, page, block, self.host_buffer, copied)
                num_bytes += len(copied) * self.spec.page_bytes
                host_pages.append(self._swapped_block_slots(state, group, page, block, copied))
                self.layout.unmap_block(slot, page, block)
                self._release(block)
            state.host_slots.append(host_pages)
        state.blocks = [[None] * len(pages) for pages in state.blocks]
        state.hashes = []  # swapped-in pages are private copies
        state.host_pages = {}  # now part of host_slots
        state.residency = [HOST] * self.spec.num_layers
        self._release_slot(request_id)
        self.pool.record_swap(bytes_out=num_bytes)
        return num_bytes

    def host_slots_held(self) -> list[int]:
        """Every host-buffer slot a request holds (swapped pages, pages of layers living on the host): with
        no other user of the buffer, exactly its allocated slots, each once."""
        held = []
        for state in self.requests.values():
            if state.host_slots is not None:
                held += [slot for group in state.host_slots for page in group if page for slot in page]
            held += [slot for host in state.host_pages.values() for slot in host]
        return held

    def chunks_to_swap_in(self, request_id: str) -> int:
        state = self.requests[request_id]
        return self.blocks.chunks_for([sum(1 for p in pages if p) for pages in state.host_slots])

    def swap_in(self, request_id: str) -> bool:
        """Brings a swapped request back into a slot. False (no change) if memory or slots lack."""
        state = self.requests[request_id]
        if not state.is_swapped:
            raise RuntimeError(f"{request_id} is not swapped out")
        if self.num_free_slots == 0:
            return False
        taken = self.blocks.take([group for group, pages in enumerate(state.host_slots) for p in pages if p])
        if taken is None:
            return False
        taken.reverse()
        slot = self.slots.assign(request_id)
        num_bytes = 0
        for group, host_pages in enumerate(state.host_slots):
            for page, host in enumerate(host_pages):
                if host is None:
                    continue
                block = self._block_of(group, taken.pop())
                state.blocks[group][page] = block
                self.layout.map_block(slot, page, block)
                self.layout.copy_block_from_host(slot, page, block, self.host_buffer, host)
                self.layout.release_host(self.host_buffer, host)
                num_bytes += len(host) * self.spec.page_bytes
        state.host_slots = None
        state.residency = [DEVICE] * self.spec.num_layers
        self.pool.record_swap(bytes_in=num_bytes)
        return True
