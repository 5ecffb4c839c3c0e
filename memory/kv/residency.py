"""Per-(request, layer) KV residency (LayerKV): a request keeps some layers' pages in the device pool
and the others in the HostBuffer, so a prompt whose whole KV does not fit starts anyway.

A layer of a request is *offloaded* (`RequestKV.residency[layer] == "host"`) when its new pages go to
the host. Its pages there are `HostPage`s (one host-buffer slot for K, one for V), keyed by
(layer, page) in `RequestKV.host_pages`; the page's `KVBlock` holds `None` at that layer's two chunk
positions, so nothing is mapped in the layer's virtual tensor and the device pool is not charged.
Pages of shared prefix blocks stay on the device (other requests read them) even in an offloaded
layer, so residency is decided per layer and stored per page.

Demotion copies a layer's device pages to the host and gives their chunks back to the pool; promotion
takes chunks, copies the host pages back and frees the host slots. The runner stages host pages into
the activations balloon for the layer being computed (engine/core/layer_staging.py).

In-place mode (`host_tier` set, the `host` backend only): an offloaded page is instead a host-tier
chunk (memory/kv/host_tier.py) kept in the block and mapped like a device chunk, so attention reads it
where it is and nothing is staged; it never counts against the pool.

`LayerResidency` is mixed into `KVCacheManager`; it uses the manager's `spec`, `requests`, `layout`,
`pool`, `host_buffer`, `host_tier`, `prefix` and `slots`, and keeps nothing of its own but counters.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from memory.host_buffer import HostBufferFull
from memory.kv.host_tier import HOST_TIER

DEVICE, HOST = "device", "host"


class HostPage(NamedTuple):
    """Host-buffer slots of one layer's K page and V page."""

    key: int
    value: int


class StagedPage(NamedTuple):
    """A host page a step reads or writes: its page index, its host slots, and whether it already
    holds tokens (a page beyond the request's computed tokens needs no fetch, only a write back)."""

    page: int
    host: HostPage
    has_data: bool


def on_device(chunk) -> bool:
    """A pool chunk (not a host-tier one, not a page living in the host buffer)."""
    return chunk is not None and chunk.owner != HOST_TIER


def in_host_tier(chunk) -> bool:
    return chunk is not None and chunk.owner == HOST_TIER


class LayerResidency:
    """Mixin for KVCacheManager: layer-wise residency, demotion, promotion and what to stage."""

    def _init_residency(self) -> None:
        self._layer_position: dict[int, tuple[int, int]] = {}  # layer -> (group, chunk index of its K)
        for group_index, group in enumerate(self.spec.groups):
            for position, layer in enumerate(group.layers):
                self._layer_position[layer] = (group_index, 2 * position)
        self.num_bytes_demoted = 0
        self.num_bytes_promoted = 0

    # ---- queries ---------------------------------------------------------------------------------
    def offloaded_layers(self, request_id: str) -> tuple[int, ...]:
        return tuple(layer for layer, where in enumerate(self.requests[request_id].residency) if where == HOST)

    def layers_with_host_pages(self, request_id: str) -> list[int]:
        state = self.requests[request_id]
        layers = {layer for layer, _ in state.host_pages}
        if self.host_tier is not None:
            layers.update(layer for layer in range(self.spec.num_layers) if self._tier_pages(state, layer))
        return sorted(layers)

    def has_host_pages(self, request_id: str) -> bool:
        """Whether the request has pages a step must stage (in-place pages need none)."""
        state = self.requests.get(request_id)
        return state is not None and bool(state.host_pages)

    def _tier_pages(self, state, layer: int) -> list[int]:
        group, position = self._layer_position[layer]
        return [page for page, block in enumerate(state.blocks[group])
                if block is not None and in_host_tier(block.chunks[position])]

    def is_whole_on_device(self, block) -> bool:
        return all(on_device(chunk) for chunk in block.chunks)

    def layer_chunk_counts(self, request_id: str) -> list[tuple[int, int]]:
        """Per layer: (device chunks, host chunks) the request holds (K and V count one each)."""
        state = self.requests[request_id]
        counts = []
        for layer in range(self.spec.num_layers):
            group, position = self._layer_position[layer]
            device = sum(2 for block in state.blocks[group] if block is not None and on_device(block.chunks[position]))
            host = 2 * sum(1 for (host_layer, _) in state.host_pages if host_layer == layer)
            if self.host_tier is not None:
                host += 2 * len(self._tier_pages(state, layer))
            counts.append((device, host))
        return counts

    def offloaded_requests_per_layer(self) -> list[int]:
        """Per layer: how many requests hold at least one of its pages on the host."""
        counts = [0] * self.spec.num_layers
        for request_id, state in self.requests.items():
            if not state.is_swapped:
                for layer in self.layers_with_host_pages(request_id):
                    counts[layer] += 1
        return counts

    @property
    def num_offloaded_host_chunks(self) -> int:
        """Host chunks held by offloaded layers (not counting whole swapped requests)."""
        in_place = self.host_tier.num_used if self.host_tier is not None else 0
        return 2 * sum(len(state.host_pages) for state in self.requests.values()) + in_place

    def _device_chunks_per_page(self, group: int, residency: Collection[str] | None,
                                offloaded: Collection[int]) -> int:
        layers = self.spec.groups[group].layers
        if residency is not None:
            return 2 * sum(1 for layer in layers if residency[layer] == DEVICE)
        return 2 * sum(1 for layer in layers if layer not in offloaded)

    def new_request_split(self, num_tokens: int, offloaded: Collection[int]) -> tuple[int, int]:
        """Device chunks and host slots a new request of `num_tokens` tokens with the layers in `offloaded` (not
        empty) on the host takes: `chunks_to_grow(None, ...)` and `host_chunks_to_grow(None, ...)` in one pass
        over the layer groups, without walking the pages (the cluster's telemetry asks it per request and layer)."""
        device = host = 0
        for group in range(len(self.spec.groups)):
            layers = self.spec.groups[group].layers
            num_pages = len(self._pages_needed(group, num_tokens))
            num_host = sum(1 for layer in layers if layer in offloaded)
            device += 2 * (len(layers) - num_host) * num_pages
            host += 2 * num_host * num_pages
        return device, host

    def host_chunks_to_grow(self, request_id: str | None, num_tokens: int, offloaded: Collection[int] = ()) -> int:
        """Host slots that growing `request_id` (None: a new request offloading `offloaded`) takes."""
        state = self.requests.get(request_id) if request_id is not None else None
        total = 0
        for group in range(len(self.spec.groups)):
            layers = self.spec.groups[group].layers
            if state is not None:
                host_layers = sum(1 for layer in layers if state.residency[layer] == HOST)
            else:
                host_layers = sum(1 for layer in layers if layer in offloaded)
            have = state.blocks[group] if state else []
            needed = self._pages_needed(group, num_tokens)
            missing = sum(1 for page in needed if page >= len(have) or have[page] is None)
            total += 2 * host_layers * missing
        return total

    def staged_pages(self, request_id: str, layer: int, end: int) -> list[StagedPage]:
        """The request's host pages of `layer` that a step computing tokens up to `end` touches."""
        state = self.requests[request_id]
        group, _ = self._layer_position[layer]
        pages = []
        for page in self._pages_needed(group, end):
            host = state.host_pages.get((layer, page))
            if host is not None:
                pages.append(StagedPage(page, host, page * self.spec.tokens_per_page < state.num_tokens))
        return pages

    def num_pages_to_stage(self, request_id: str, layer: int, end: int) -> int:
        """Pages of `layer` a step computing the request up to `end` tokens stages: its host pages
        there, and the pages growth will add on the host (in place: none, nothing is staged)."""
        if self.host_tier is not None:
            return 0
        state = self.requests[request_id]
        group, _ = self._layer_position[layer]
        blocks = state.blocks[group]
        count = 0
        for page in self._pages_needed(group, end):
            if (layer, page) in state.host_pages:
                count += 1
            elif (page >= len(blocks) or blocks[page] is None) and state.residency[layer] == HOST:
                count += 1
        return count

    # ---- demotion and promotion ------------------------------------------------------------------
    def chunks_freed_by_demoting(self, request_id: str, layer: int) -> int:
        state = self.requests[request_id]
        group, position = self._layer_position[layer]
        return sum(2 for block in state.blocks[group]
                   if block is not None and on_device(block.chunks[position]) and block.ref_count == 1)

    def demote(self, request_id: str, layer: int) -> int:
        """Moves the request's private pages of `layer` to the host; its new pages go there too.
        Returns the device chunks freed. Raises HostBufferFull (nothing changed) without room."""
        state = self.requests[request_id]
        if state.is_swapped:
            raise ValueError(f"request {request_id} is swapped out")
        self._check_all_layers_held()
        group, position = self._layer_position[layer]
        blocks = [(page, block) for page, block in enumerate(state.blocks[group])
                  if block is not None and on_device(block.chunks[position]) and block.ref_count == 1]
        if self.host_tier is not None:
            return self._demote_in_place(state, layer, blocks)
        host_slots = self.host_buffer.allocate(2 * len(blocks)) if blocks else []
        if host_slots:
            self.layout.host_allocated(host_slots)
        slot = self.slot_of(request_id)
        freed = []
        for index, (page, block) in enumerate(blocks):
            if block.block_hash is not None:  # a partial block is no longer a prefix-cache entry
                self.prefix.forget(block)
            host = HostPage(host_slots[2 * index], host_slots[2 * index + 1])
            self.layout.layer_page_to_host(block, layer, slot, page, self.host_buffer, host)
            freed += block.chunks[position : position + 2]
            block.chunks[position] = block.chunks[position + 1] = None
            state.host_pages[(layer, page)] = host
        if freed:
            self.pool.deflate(self._kv_client, freed)
        state.residency[layer] = HOST
        self.num_bytes_demoted += len(freed) * self.spec.page_bytes
        return len(freed)

    def chunks_to_promote(self, request_id: str, layer: int) -> int:
        state = self.requests[request_id]
        in_place = len(self._tier_pages(state, layer)) if self.host_tier is not None else 0
        return 2 * (sum(1 for (host_layer, _) in state.host_pages if host_layer == layer) + in_place)

    def promote(self, request_id: str, layer: int) -> bool:
        """Brings the request's host pages of `layer` back to the device. False (no change) if the
        chunks are not there."""
        state = self.requests[request_id]
        group, position = self._layer_position[layer]
        if self.host_tier is not None:
            return self._promote_in_place(state, layer)
        pages = sorted(page for (host_layer, page) in state.host_pages if host_layer == layer)
        chunks = self._take_chunks(2 * len(pages))
        if chunks is None:
            return False
        slot = self.slot_of(request_id)
        for page in pages:
            host = state.host_pages.pop((layer, page))
            key_chunk, value_chunk = chunks.pop(), chunks.pop()
            block = state.blocks[group][page]
            block.chunks[position], block.chunks[position + 1] = key_chunk, value_chunk
            self.layout.layer_page_from_host(block, layer, slot, page, (key_chunk, value_chunk), self.host_buffer, host)
            self.layout.release_host(self.host_buffer, list(host))
        state.residency[layer] = DEVICE
        self.num_bytes_promoted += 2 * len(pages) * self.spec.page_bytes
        return True

    # ---- in place (host backend): host-tier chunks mapped where device chunks were ----------------
    def _swap_page_chunks(self, state, layer: int, page: int, block, new_chunks: list) -> list:
        """Replaces one layer's K and V chunks of a mapped page, carrying the data over; returns the old."""
        _, position = self._layer_position[layer]
        self.layout.swap_layer_page(block, layer, self.slot_of(state.request_id), page, tuple(new_chunks))
        old = block.chunks[position : position + 2]
        block.chunks[position], block.chunks[position + 1] = new_chunks
        return old

    def _demote_in_place(self, state, layer: int, blocks: list) -> int:
        tier_chunks = self.host_tier.allocate(2 * len(blocks))
        freed = []
        for page, block in blocks:
            if block.block_hash is not None:
                self.prefix.forget(block)
            freed += self._swap_page_chunks(state, layer, page, block, [tier_chunks.pop(), tier_chunks.pop()])
        if freed:
            self.pool.deflate(self._kv_client, freed)
        state.residency[layer] = HOST
        self.num_bytes_demoted += len(freed) * self.spec.page_bytes
        return len(freed)

    def _promote_in_place(self, state, layer: int) -> bool:
        group, _ = self._layer_position[layer]
        pages = self._tier_pages(state, layer)
        chunks = self._take_chunks(2 * len(pages))
        if chunks is None:
            return False
        for page in pages:
            block = state.blocks[group][page]
            old = self._swap_page_chunks(state, layer, page, block, [chunks.pop(), chunks.pop()])
            self.host_tier.release(old)
        state.residency[layer] = DEVICE
        self.num_bytes_promoted += 2 * len(pages) * self.spec.page_bytes
        return True

    # ---- hooks the manager calls -----------------------------------------------------------------
    def _check_all_layers_held(self) -> None:
        # blocks hold chunks of held layers only when a peer keeps the others' KV (KunServe): chunk
        # positions would no longer be 2 x the layer's place in its group
        if len(self.layout.held_layers) != self.spec.num_layers:
            raise ValueError("layer-wise offloading needs every layer's KV held here (not with a KunServe pair)")

    def _host_chunks_per_page(self, group: int, residency) -> int:
        return 2 * sum(1 for layer in self.spec.groups[group].layers if residency[layer] == HOST)

    def _release_chunks(self, chunks) -> None:
        """A freed block's chunks: pool chunks back to the pool, host-tier chunks back to the tier."""
        device = [chunk for chunk in chunks if on_device(chunk)]
        if device:
            self.pool.deflate(self._kv_client, device)
        tier = [chunk for chunk in chunks if in_host_tier(chunk)]
        if tier:
            self.host_tier.release(tier)

    def _allocate_host_pages(self, state, group: int, page: int) -> list[tuple[int, HostPage]] | None:
        """Host slots for the offloaded layers of a new page (None, nothing held, if the buffer is full)."""
        layers = [layer for layer in self.spec.groups[group].layers if state.residency[layer] == HOST]
        if not layers or self.host_tier is not None:  # in place: host-tier chunks go into the block
            return []
        try:
            slots = self.host_buffer.allocate(2 * len(layers))
        except (HostBufferFull, AttributeError):
            return None
        self.layout.host_allocated(slots)
        return [(layer, HostPage(slots[2 * i], slots[2 * i + 1])) for i, layer in enumerate(layers)]

    def _free_host_pages(self, state, group: int, page: int) -> None:
        for layer in self.spec.groups[group].layers:
            host = state.host_pages.pop((layer, page), None)
            if host is not None:
                self.layout.release_host(self.host_buffer, list(host))

    def _swapped_block_slots(self, state, group: int, page: int, block, copied: list[int]) -> list[int]:
        """A swapped-out block's host slots in chunk order: `copied` for its device chunks, the
        offloaded layers' host pages (taken over, not copied) for the others."""
        copied = list(copied)
        slots = []
        for layer in self.spec.groups[group].layers:
            _, position = self._layer_position[layer]
            if block.chunks[position] is not None:
                slots += [copied.pop(0), copied.pop(0)]
            else:
                slots += list(state.host_pages.pop((layer, page)))
        return slots
