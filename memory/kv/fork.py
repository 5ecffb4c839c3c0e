"""Forking a request's KV: the n choices of one prompt share the prompt's pages (prefilled once).

A fork gives the child a slot of its own in which every page of the parent is mapped, shared (one more
reference, no copy), except the last page when the prompt ends inside it: both will write their next tokens
there, so the child gets a private copy of that page (copy-on-fork, one block per layer group). Shared pages
go back to the pool when their last holder lets go, exactly as prefix-cache hits do (`_release`), so the
pool's accounting stays exact: a page is held once however many choices map it.

Only a request whose KV is all on the device forks (not swapped, no layer on the host): the scheduler keeps
the choices of a layer-offloaded prompt as separate requests.
"""

from __future__ import annotations

from memory.kv.residency import HOST


class SequenceFork:
    """Mixed into KVCacheManager (it provides requests, slots, blocks, layout, prefix, spec)."""

    def can_fork(self, request_id: str) -> bool:
        """Whether the request's KV is forkable at all (on the device: not swapped, no layer on the host). The
        copy is logged by a recording layout, so tensor-parallel ranks and a cooperative follower replay it."""
        state = self.requests.get(request_id)
        return state is not None and not state.is_swapped and HOST not in state.residency and not state.host_pages

    def chunks_to_fork(self, num_tokens: int) -> int:
        """Device chunks one fork of a request with `num_tokens` computed tokens takes: a private copy of the
        partly filled last page in each layer group (none when the tokens end on a page boundary)."""
        if num_tokens % self.spec.tokens_per_page == 0:
            return 0
        return self.blocks.chunks_for([1] * len(self.spec.groups))

    def fork(self, parent_id: str, child_id: str) -> bool:
        """Gives `child_id` a slot sharing every computed page of `parent_id` (the last partial page copied).
        False, with nothing held, when the parent cannot fork, no slot is free or the copy's chunks lack."""
        if child_id in self.requests or not self.can_fork(parent_id) or self.num_free_slots == 0:
            return False
        parent = self.requests[parent_id]
        page_tokens = self.spec.tokens_per_page
        partial = parent.num_tokens // page_tokens if parent.num_tokens % page_tokens else None
        copied_groups = [group for group, pages in enumerate(parent.blocks)
                         if partial is not None and partial < len(pages) and pages[partial] is not None]
        taken = self.blocks.take(copied_groups)
        if taken is None:
            return False
        taken.reverse()
        parent_slot = self.slot_of(parent_id)
        slot = self.slots.assign(child_id)
        child = self._new_state(child_id)
        child.num_tokens = parent.num_tokens
        child.hashes = list(parent.hashes)
        for group, pages in enumerate(parent.blocks):
            for page, block in enumerate(pages):
                if block is None:
                    child.blocks[group].append(None)
                elif page == partial:
                    copy = self._block_of(group, taken.pop())
                    self.layout.map_block(slot, page, copy)
                    self.layout.copy_block(parent_slot, slot, page, block, copy)
                    child.blocks[group].append(copy)
                else:
                    if block.block_hash is not None:
                        self.prefix.hold(block)  # held by the parent, so not evictable: one more reference
                    else:
                        block.ref_count += 1
                    self.layout.map_block(slot, page, block)
                    child.blocks[group].append(block)
        return True
