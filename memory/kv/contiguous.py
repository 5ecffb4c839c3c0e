"""The `contiguous` KV layout (vTensor / vAttention): per layer, K and V are virtual tensors
`[max_slots, max_len, kv_heads, head_dim]`; a request owns one slot and pages are mapped into its
slot's range as it grows. Attention reads `cache[:B, :L]` in place, with no block table and no gather.

Page `i` of slot `s` in every layer tensor is virtual page `s * pages_per_slot + i`. Unmapped pages
read as zeros (the VMM backend's scratch), so padded positions are finite and masked.
"""

from __future__ import annotations

import torch

from memory.kv.blocks import KVBlock
from memory.kv.layout import KVLayout
from memory.kv.spec import KVCacheSpec
from memory.virtual_tensor import VirtualTensor
from memory.vmm.base import VmmBackend


class ContiguousLayout(KVLayout):
    name = "contiguous"

    def __init__(self, spec: KVCacheSpec, backend: VmmBackend, dtype: torch.dtype):
        self.spec = spec
        shape = (spec.max_slots, spec.max_len, spec.num_kv_heads, spec.head_dim)
        # tensors[layer] = (K, V)
        self.tensors = [
            (
                VirtualTensor(backend, shape, dtype, spec.page_bytes),
                VirtualTensor(backend, shape, dtype, spec.page_bytes),
            )
            for _ in range(spec.num_layers)
        ]
        # layers whose pages this device keeps (all, unless a peer holds some layers' KV: KunServe)
        self.held_layers = frozenset(range(spec.num_layers))

    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What attention reads and writes: one (K, V) tensor pair per layer."""
        return [(k.tensor, v.tensor) for k, v in self.tensors]

    def _page(self, slot: int, page: int) -> int:
        return slot * self.spec.pages_per_slot + page

    def _block_tensors(self, block: KVBlock) -> list[VirtualTensor]:
        """The virtual tensors of a block's device chunks, in the block's chunk order. A chunk is
        None where that layer's page lives on the host (layer-wise offloading): nothing is mapped."""
        layers = self.spec.groups[block.group].layers
        tensors = [tensor for layer in layers if layer in self.held_layers for tensor in self.tensors[layer]]
        return [tensor for tensor, chunk in zip(tensors, block.chunks, strict=True) if chunk is not None]

    def map_block(self, slot: int, page: int, block: KVBlock) -> None:
        index = self._page(slot, page)
        chunks = [chunk for chunk in block.chunks if chunk is not None]
        for tensor, chunk in zip(self._block_tensors(block), chunks, strict=True):
            tensor.map_page(index, chunk)

    def unmap_block(self, slot: int, page: int, block: KVBlock) -> None:
        index = self._page(slot, page)
        for tensor in self._block_tensors(block):
            tensor.unmap_page(index)

    def move_block(self, block: KVBlock, src_slot: int, dst_slot: int, page: int) -> None:
        """Remaps a block from one slot to another; no KV data is copied."""
        src, dst = self._page(src_slot, page), self._page(dst_slot, page)
        for tensor in self._block_tensors(block):
            tensor.move_page(src, dst)

    def block_pages(self, slot: int, page: int, block: KVBlock) -> list[torch.Tensor]:
        """uint8 views of a mapped block's device chunks (for copies to and from the host)."""
        index = self._page(slot, page)
        return [tensor.page_tensor(index) for tensor in self._block_tensors(block)]

    # ---- one layer's page (layer-wise residency and staging) ---------------------------------
    def map_layer_page(self, layer: int, slot: int, page: int, key_chunk, value_chunk) -> None:
        index = self._page(slot, page)
        key, value = self.tensors[layer]
        key.map_page(index, key_chunk)
        value.map_page(index, value_chunk)

    def unmap_layer_page(self, layer: int, slot: int, page: int) -> tuple:
        """Unmaps one layer's K and V page of a slot; returns the two chunks that were there."""
        index = self._page(slot, page)
        key, value = self.tensors[layer]
        return key.unmap_page(index), value.unmap_page(index)

    def layer_page_views(self, layer: int, slot: int, page: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 views of one layer's K and V page of a slot (mapped or about to be read as zeros)."""
        index = self._page(slot, page)
        key, value = self.tensors[layer]
        return key.page_tensor(index), value.page_tensor(index)

    def block_freed(self, block: KVBlock) -> None:
        """The block's chunks went back to the pool (a mirroring layout forwards this)."""

    def read_tokens(self, slot: int, start: int, end: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Copies of a slot's tokens [start, end) of K and V, per layer (for migration); a layer held
        elsewhere (KunServe) has no pages here and reads as zeros, without touching its virtual range."""
        return [(k.tensor[slot, start:end].clone(), v.tensor[slot, start:end].clone()) if layer in self.held_layers
                else (torch.zeros_like(k.tensor[slot, start:end]), torch.zeros_like(v.tensor[slot, start:end]))
                for layer, (k, v) in enumerate(self.tensors)]

    def write_tokens(self, slot: int, start: int, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Writes K and V of every held layer (a layer held elsewhere has no pages here to write)."""
        for layer, ((k, v), (key, value)) in enumerate(zip(self.tensors, layers, strict=True)):
            if layer not in self.held_layers:
                continue
            k.tensor[slot, start : start + key.shape[0]].copy_(key)
            v.tensor[slot, start : start + value.shape[0]].copy_(value)

    def close(self) -> None:
        for k, v in self.tensors:
            k.close()
            v.close()


