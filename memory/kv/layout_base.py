"""What every KV layout shares: host-buffer copies of a block, done through the layout's `block_pages`."""

from __future__ import annotations

import torch

from memory.kv.blocks import KVBlock


class HostCopies:
    """Mixin: swap a block's chunks to and from the host buffer through `block_pages(slot, page, block)`
    (uint8 views of the chunks, in the block's chunk order)."""

    def block_pages(self, slot: int, page: int, block: KVBlock) -> list[torch.Tensor]:
        raise NotImplementedError

    def copy_block_to_host(self, slot: int, page: int, block: KVBlock, host_buffer, host_slots: list[int]) -> None:
        for host_slot, view in zip(host_slots, self.block_pages(slot, page, block), strict=True):
            host_buffer.copy_in(host_slot, view)

    def copy_block_from_host(self, slot: int, page: int, block: KVBlock, host_buffer, host_slots: list[int]) -> None:
        for host_slot, view in zip(host_slots, self.block_pages(slot, page, block), strict=True):
            host_buffer.copy_out(host_slot, view)

    def release_host(self, host_buffer, host_slots: list[int]) -> None:
        host_buffer.free(host_slots)

    def block_freed(self, block: KVBlock) -> None:
        """The block's chunks went back to the pool (a mirroring layout forwards this)."""
