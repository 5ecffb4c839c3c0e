"""Invariants of a KVCacheManager that can be checked at any step boundary: tests assert them after every
operation, and an engine with `check_kv_invariants` checks them after every step and engine call (a debug mode
that finds the first operation breaking them; it costs a walk over every page of every slot).

Contiguous layouts only (a paged layout keeps block tables, checked by its own tests)."""

from __future__ import annotations


def mapping_violations(kv, limit: int = 5) -> list[str]:
    """Up to `limit` ways the slots' page mappings differ from the requests' blocks (empty: none). Each page of each
    held layer's K and V tensor must map exactly the chunk its slot's request holds there (a page of a layer on the
    host maps nothing; in place, its tier chunk); pages of unused slots and pages not grown into map nothing; the
    slot table is dense and every resident request owns the slot it is recorded in."""
    layout = getattr(kv.layout, "_layout", kv.layout)  # under a tensor-parallel recording wrapper
    if not hasattr(layout, "tensors"):
        return []
    spec, found = kv.spec, []
    if sorted(kv.slots.slot_of.values()) != list(range(kv.slots.num_used)):
        found.append(f"slot table not dense: {kv.slots.slot_of}")
    owners = {}
    for slot, request_id in enumerate(kv.slots.requests):
        state = kv.requests.get(request_id)
        if state is None or state.is_swapped:
            where = "swapped" if state else "not in the cache"
            found.append(f"slot {slot} belongs to {request_id!r}, which is {where}")
        else:
            owners[slot] = state
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
                        if tensor.chunk_at(slot * spec.pages_per_slot + page) is not want:
                            owner = state.request_id if state is not None else None
                            found.append(f"slot {slot} ({owner!r}) layer {layer} {'KV'[which]} page {page}: "
                                         f"{'' if tensor.is_mapped(slot * spec.pages_per_slot + page) else 'un'}mapped"
                                         f", its block {'has no chunk there' if want is None else 'has a chunk there'}")
                            if len(found) >= limit:
                                return found
    return found
