"""Import and export of a request's KV for live migration (staged: the source keeps decoding while pages are copied).

`KVImportExport` is mixed into `KVCacheManager`. Source: `read_kv` copies tokens out of a slot (offloaded layers'
host pages overlaid: `LayeredMigration`). Destination: `reserve_import` takes a slot and every page (some layers
on the host: `LayeredMigration._reserve_layered_import`), `write_kv` stores staged copies, `finish_import` makes
the request an ordinary resident one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class KVImportExport:
    def read_kv(self, request_id: str, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of tokens [start, end) of K and V, per layer (layout-independent)."""
        state = self.requests[request_id]
        if state.is_swapped:
            raise ValueError("swap the request in before reading its KV")
        layers = self.layout.read_tokens(self.slot_of(request_id), start, end)
        self._read_host_overlay(state, layers, start, end)  # offloaded pages read as zeros in the device view
        return layers

    def reserve_import(self, request_id: str, num_tokens: int, offloaded: Sequence[int] = ()) -> bool:
        """Gives an incoming request a slot and every page for `num_tokens` tokens (sliding windows
        included, so any token can be written), the layers in `offloaded` on the host. False, with nothing
        held, if it does not fit."""
        if num_tokens > self.spec.max_len:  # its last pages would land in the next slot's range
            raise ValueError(f"{num_tokens} tokens exceed the slot length {self.spec.max_len}")
        if self.num_free_slots == 0 or request_id in self.requests:
            return False
        if offloaded:
            return self._reserve_layered_import(request_id, num_tokens, offloaded)
        num_pages = self.spec.num_pages(num_tokens)
        taken = self.blocks.take([group for group in range(len(self.spec.groups)) for _ in range(num_pages)])
        if taken is None:
            return False
        taken.reverse()
        slot = self.slots.assign(request_id)
        state = self._new_state(request_id)
        for group in range(len(self.spec.groups)):
            for page in range(num_pages):
                block = self._block_of(group, taken.pop())
                state.blocks[group].append(block)
                self.layout.map_block(slot, page, block)
        return True

    def write_kv(self, request_id: str, start: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        layers = self._write_host_tokens(self.requests[request_id], start, layers)  # offloaded layers' pages
        self.layout.write_tokens(self.slot_of(request_id), start, layers)

    def finish_import(self, request_id: str, num_tokens: int) -> None:
        """All `num_tokens` tokens are written: the request is an ordinary resident request now."""
        state = self.requests[request_id]
        state.num_tokens = num_tokens
        self._drop_out_of_window(state)
