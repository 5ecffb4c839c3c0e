"""Invariants of a KVCacheManager that any test can assert after any operation."""

from __future__ import annotations

from memory.kv import KVCacheManager


def assert_mappings_match_blocks(kv: KVCacheManager) -> None:
    """Every page of every layer's K and V tensor (contiguous layout) maps exactly the chunk that its slot's
    request holds there: a page of a layer on the host maps nothing (or, in place, its tier chunk), and the
    pages of unused slots and of pages a request has not grown into map nothing. A stale mapping here is what
    a later `map_block` trips over ("page N is already mapped")."""
    spec, layout = kv.spec, getattr(kv.layout, "_layout", kv.layout)  # under a recording (TP) wrapper
    owners = {slot: kv.requests[request_id] for slot, request_id in enumerate(kv.slots.requests)}
    assert sorted(kv.slots.slot_of.values()) == list(range(kv.slots.num_used))
    for request_id, state in kv.requests.items():
        assert state.is_swapped or owners[kv.slot_of(request_id)] is state, request_id
    for slot in range(spec.max_slots):
        state = owners.get(slot)
        for group_index, group in enumerate(spec.groups):
            pages = state.blocks[group_index] if state is not None else []
            held = [layer for layer in group.layers if layer in layout.held_layers]
            for position, layer in enumerate(held):
                for which in (0, 1):
                    tensor = layout.tensors[layer][which]
                    for page in range(spec.pages_per_slot):
                        block = pages[page] if page < len(pages) else None
                        want = block.chunks[2 * position + which] if block is not None else None
                        got = tensor.chunk_at(slot * spec.pages_per_slot + page)
                        assert got is want, (state.request_id if state else None, slot, layer, which, page)
