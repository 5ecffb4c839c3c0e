"""Migration of a request whose layers live partly on the host (LayerKV), on both ends.

Source: `read_kv` reads the device view of a slot, where a page of an offloaded layer kept in the
HostBuffer reads as zeros; `overlay_host_pages` puts those pages' tokens in (in place, host-tier pages
are mapped and read like device pages: nothing to overlay).

Destination: a request imported with some layers on the host (`reserve_layered_import`) gets, for
every page of its reservation, pool chunks for its device layers and, for its offloaded ones, host
pages (HostBuffer slots; in place: host-tier chunks mapped at the page like device chunks). Its
staged copies are then written through the layout for the device layers and straight into the host
pages for the others (`write_host_pages`): nothing of an offloaded layer is ever mapped in the pool.

`LayeredMigration` is mixed into `KVCacheManager` (with `LayerResidency`); the two page-copy functions
take plain arguments so that a tensor-parallel worker (engine/parallel/worker.py), which keeps its own
heads' host pages at the same slots as rank 0, runs them on its share.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping

import torch

from memory.kv.residency import DEVICE, HOST, HostPage

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


def _page_spans(host_buffer, host_pages: Mapping[tuple[int, int], HostPage], layers: KVLayers, start: int,
                end: int, page_tokens: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(the slice of a layer's K or V tensor of tokens [start, end), the same tokens' slice of its host page)
    for every host page in `host_pages` ((layer, page) -> slots) that holds some of those tokens."""
    for (layer, page), host in host_pages.items():
        offset = page * page_tokens
        first, last = max(start, offset), min(end, offset + page_tokens)
        if first >= last:
            continue
        like = layers[layer][0]
        for tensor, slot in zip(layers[layer], host, strict=True):
            page_view = host_buffer.view(slot).view(like.dtype).view(page_tokens, *like.shape[1:])
            yield tensor[first - start : last - start], page_view[first - offset : last - offset]


def overlay_host_pages(host_buffer, host_pages: Mapping[tuple[int, int], HostPage], layers: KVLayers,
                       start: int, end: int, page_tokens: int) -> None:
    """Copies the tokens of [start, end) that `host_pages` ((layer, page) -> slots) hold into `layers`
    (per layer K, V of tokens [start, end), as read from the device view)."""
    for tensor, page_view in _page_spans(host_buffer, host_pages, layers, start, end, page_tokens):
        tensor.copy_(page_view)


def write_host_pages(host_buffer, host_pages: Mapping[tuple[int, int], HostPage], layers: KVLayers,
                     start: int, page_tokens: int) -> KVLayers:
    """Writes the tokens of `layers` (per layer K, V from token `start`) that fall in `host_pages` into the
    host buffer; returns `layers` with those layers emptied (zero tokens), for the layout to write the rest."""
    end = start + (layers[0][0].shape[0] if layers else 0)
    for tensor, page_view in _page_spans(host_buffer, host_pages, layers, start, end, page_tokens):
        page_view.copy_(tensor)
    # an offloaded layer's pages are not mapped in the pool: the layout writes nothing of it
    on_host = {layer for layer, _ in host_pages}
    return [(key[:0], value[:0]) if layer in on_host else (key, value) for layer, (key, value) in enumerate(layers)]


class LayeredMigration:
    """Mixin for KVCacheManager: the host pages' part of read_kv / reserve_import / write_kv."""

    def host_room(self) -> int:
        """Host chunks offloaded layers may still take (host-tier chunks in place, else HostBuffer slots)."""
        if self.host_tier is not None:
            return self.host_tier.num_free
        return self.host_buffer.num_free if self.host_buffer is not None else 0

    def _reserve_layered_import(self, request_id: str, num_tokens: int, offloaded: Collection[int]) -> bool:
        """reserve_import with the layers in `offloaded` on the host: every page of the reservation gets pool
        chunks for the other layers and host pages for these. False, with nothing held, if either lacks."""
        self._check_all_layers_held()
        residency = [HOST if layer in offloaded else DEVICE for layer in range(self.spec.num_layers)]
        num_pages = self.spec.num_pages(num_tokens)
        groups = range(len(self.spec.groups))
        num_device = num_pages * sum(self._device_chunks_per_page(group, residency, ()) for group in groups)
        num_host = num_pages * sum(self._host_chunks_per_page(group, residency) for group in groups)
        if num_host > self.host_room():
            return False
        chunks = self._take_chunks(num_device)
        if chunks is None:
            return False
        tier_chunks = self.host_tier.allocate(num_host) if self.host_tier is not None else []
        host_slots = self.host_buffer.allocate(num_host) if self.host_tier is None else []
        if host_slots:
            self.layout.host_allocated(host_slots)
        host_slots.reverse()
        slot = self.slots.assign(request_id)
        state = self._new_state(request_id)
        state.residency = residency
        for group in groups:
            for page in range(num_pages):
                block = self._new_block(group, chunks, residency, tier_chunks)
                state.blocks[group].append(block)
                if self.host_tier is None:
                    for layer in self.spec.groups[group].layers:
                        if residency[layer] == HOST:
                            state.host_pages[(layer, page)] = HostPage(host_slots.pop(), host_slots.pop())
                self.layout.map_block(slot, page, block)
        return True

    def _read_host_overlay(self, state, layers: KVLayers, start: int, end: int) -> None:
        if state.host_pages:
            overlay_host_pages(self.host_buffer, state.host_pages, layers, start, end, self.spec.tokens_per_page)

    def _write_host_tokens(self, state, start: int, layers: KVLayers) -> KVLayers:
        if not state.host_pages:
            return layers
        return write_host_pages(self.host_buffer, state.host_pages, layers, start, self.spec.tokens_per_page)
