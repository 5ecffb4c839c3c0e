"""Weights in the pool's `weights` balloon, one virtual range per decoder layer (KunServe's unit of dropping).

Each layer's tensors sit on pages of their own (a bump allocator per layer's virtual range); the
tensors shared by every layer (embeddings, final norm, lm head, RoPE table) have one more range. With
`keep_host_copy`, `seal()` copies every layer's pages into a HostBuffer (pinned on CUDA), so
`drop_layers` only unmaps pages and deflates the balloon — the freed chunks are the pool's at once,
KV can take them in the same step — and `restore_layers` maps fresh chunks under the same addresses
and copies the bytes back: no model reload, and the model's tensor views stay valid throughout.

Contract: pages of a dropped layer are unmapped (reads see zeros or scratch; a write is a bug), so the
model must not run a dropped layer (LlamaModel.forward_stage checks). `restore_layers` is all or
nothing: PoolExhausted leaves the layers dropped and the pool unchanged. Tensor-parallel ranks keep
no host copy (dropping is for replicas of the whole model).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from memory.host_buffer import HostBuffer
from memory.pool import ElasticPool
from memory.virtual_tensor import VirtualTensor

WEIGHTS_CLIENT = "weights"
SHARED = None  # the segment key of the tensors every layer uses; layers are keyed by their index
_ALIGN = 64


def aligned_end(num_bytes: int, tensor: torch.Tensor) -> int:
    """Where `tensor` ends when bump-allocated after `num_bytes` bytes (starts 64-byte aligned)."""
    return -(-num_bytes // _ALIGN) * _ALIGN + tensor.numel() * tensor.element_size()


class _Segment:
    """One virtual range (a layer, or the shared tensors) with a bump allocator over its pages."""

    def __init__(self, pool: ElasticPool, max_bytes: int):
        self.pool = pool
        num_pages = max(1, -(-max_bytes // pool.chunk_bytes))
        self.buffer = VirtualTensor(pool.backend, (num_pages * pool.chunk_bytes,), torch.uint8, pool.chunk_bytes)
        self.num_mapped = 0  # pages 0..num_mapped-1 hold placed bytes (unless dropped)
        self.num_bytes = 0
        self.host_slots: list[int] = []  # one host-buffer slot per page once sealed
        self.is_dropped = False

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        end = aligned_end(self.num_bytes, tensor)
        start = end - tensor.numel() * tensor.element_size()
        self._map_up_to(-(-end // self.pool.chunk_bytes))
        placed = self.buffer.tensor[start:end].view(tensor.dtype).view(tensor.shape)
        placed.copy_(tensor)
        self.num_bytes = end
        return placed

    def _map_up_to(self, num_pages: int) -> None:
        if num_pages > self.num_mapped:
            chunks = self.pool.inflate(WEIGHTS_CLIENT, num_pages - self.num_mapped)
            self.buffer.map_pages(self.num_mapped, chunks)
            self.num_mapped = num_pages

    def unmap_all(self) -> None:
        if self.num_mapped and not self.is_dropped:
            self.pool.deflate(WEIGHTS_CLIENT, self.buffer.unmap_pages(0, self.num_mapped))


class WeightArena:
    """Places a model's tensors per layer; drops and restores layer ranges (see the module docstring).

    `segment_bytes` is the placed size of each segment (a dry run measures it: `measure_segments`).
    """

    def __init__(self, pool: ElasticPool, segment_bytes: Mapping[int | None, int], keep_host_copy: bool = False,
                 device: str | torch.device = "cpu"):
        self.pool = pool
        self.page_bytes = pool.chunk_bytes
        if WEIGHTS_CLIENT not in pool.clients:  # several models' arenas share one pool's balloon (EngineGroup)
            pool.register(WEIGHTS_CLIENT)
        self.segments = {key: _Segment(pool, num_bytes) for key, num_bytes in segment_bytes.items()}
        self.layers = sorted(key for key in self.segments if key is not SHARED)
        self.device = torch.device(device)
        self.host: HostBuffer | None = None
        if keep_host_copy:
            num_pages = sum(self.segments[layer].buffer.num_pages for layer in self.layers)
            self.host = HostBuffer(num_pages * self.page_bytes, self.page_bytes, device)
        self.num_drops = 0
        self.num_restores = 0

    def place(self, tensor: torch.Tensor, layer: int | None = SHARED) -> torch.Tensor:
        """Copies `tensor` onto `layer`'s pages (SHARED: the tensors every layer uses); returns the
        pool-backed tensor (same shape and dtype, an address that never changes)."""
        return self.segments[layer].place(tensor.contiguous())

    def seal(self) -> None:
        """Every tensor is placed: take the host copy of each layer's pages (when keeping one)."""
        if self.host is None:
            return
        for layer in self.layers:
            segment = self.segments[layer]
            segment.host_slots = self.host.allocate(segment.num_mapped)
            for page, slot in enumerate(segment.host_slots):
                self.host.copy_in(slot, segment.buffer.page_tensor(page))
        self._synchronize()

    # ---- dropping ------------------------------------------------------------------------------
    @property
    def can_drop(self) -> bool:
        return self.host is not None

    @property
    def dropped_layers(self) -> frozenset[int]:
        return frozenset(layer for layer in self.layers if self.segments[layer].is_dropped)

    def layer_chunks(self, layers: Iterable[int]) -> int:
        """Chunks the given layers' weights take on the device (dropped or not)."""
        return sum(self.segments[layer].num_mapped for layer in layers)

    @property
    def held_bytes(self) -> int:
        """Bytes of pool chunks this arena's weights hold now."""
        return sum(s.num_mapped for s in self.segments.values() if not s.is_dropped) * self.page_bytes

    @property
    def dropped_bytes(self) -> int:
        return self.layer_chunks(self.dropped_layers) * self.page_bytes

    def drop_layers(self, layers: Iterable[int]) -> int:
        """Unmaps the layers' pages and gives their chunks back to the pool; returns how many.
        Layers already dropped are skipped."""
        if self.host is None:
            raise RuntimeError("this arena keeps no host copy of its weights: nothing can be dropped")
        segments = [self.segments[layer] for layer in self._checked(layers) if not self.segments[layer].is_dropped]
        self._synchronize()  # no kernel may still read a page we unmap
        freed = []
        for segment in segments:
            freed.extend(segment.buffer.unmap_pages(0, segment.num_mapped))
            segment.is_dropped = True
        self.pool.deflate(WEIGHTS_CLIENT, freed)
        self.num_drops += bool(segments)
        return len(freed)

    def restore_layers(self, layers: Iterable[int]) -> int:
        """Maps fresh chunks under the dropped layers' pages and copies their bytes back from the host
        copy; returns the chunks taken. All or nothing (PoolExhausted leaves everything as it was)."""
        segments = [self.segments[layer] for layer in self._checked(layers) if self.segments[layer].is_dropped]
        chunks = self.pool.inflate(WEIGHTS_CLIENT, sum(segment.num_mapped for segment in segments))
        taken = len(chunks)
        for segment in segments:
            mine, chunks = chunks[: segment.num_mapped], chunks[segment.num_mapped :]
            segment.buffer.map_pages(0, mine)
            for page, slot in enumerate(segment.host_slots):
                self.host.copy_out(slot, segment.buffer.page_tensor(page))
            segment.is_dropped = False
        self._synchronize()
        self.num_restores += bool(segments)
        return taken

    def _checked(self, layers: Iterable[int]) -> list[int]:
        layers = list(layers)
        unknown = [layer for layer in layers if layer not in self.segments or layer is SHARED]
        if unknown:
            raise ValueError(f"layers {unknown} are not decoder layers of this model (0..{len(self.layers) - 1})")
        return layers

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def close(self) -> None:
        for segment in self.segments.values():
            segment.unmap_all()
            segment.buffer.close()


def measure_segments(build) -> dict[int | None, int]:
    """Bytes each segment takes once placed: a dry run of `build(allocate)` with a counting allocator."""
    sizes: dict[int | None, int] = {}

    def count(tensor: torch.Tensor, layer: int | None = SHARED) -> torch.Tensor:
        sizes[layer] = aligned_end(sizes.get(layer, 0), tensor)
        return tensor

    build(count)
    return sizes


def placed_bytes(segment_bytes: Mapping[int | None, int], page_bytes: int) -> int:
    """Device bytes the segments take: each on whole pages of its own."""
    return sum(max(1, -(-size // page_bytes)) * page_bytes for size in segment_bytes.values())
