"""VirtualTensor: a torch tensor over a reserved virtual range whose pages are mapped on demand.

The range is reserved once; `.tensor` is a shaped, typed, zero-copy view of it and its
`data_ptr()` never changes. Physical chunks (one page each) are mapped in and out underneath it.
The same chunk may be mapped at several pages, of this tensor or of others, at once (prefix
sharing); `move_page` remaps a page elsewhere without copying its bytes. Unmapped pages read as
zeros (host) or scratch (cuda); writing to them is a bug (on the host backend it kills the process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from memory.vmm.base import BackendClosed, PhysicalChunk, VmmBackend


class VirtualTensor:
    """A `shape`/`dtype` tensor over `num_pages` pages of `page_bytes` each.

    Contract: `page_bytes` is a positive multiple of the backend granularity; the reservation is
    ceil(nbytes / page_bytes) * page_bytes bytes; every chunk mapped has num_bytes == page_bytes;
    a page must be unmapped before something else is mapped there. The backend keeps
    `chunk.num_mappings` (+1 per map, -1 per unmap). Which pages are mapped is tracked here.
    """

    def __init__(self, backend: VmmBackend, shape: Sequence[int], dtype: torch.dtype,
                 page_bytes: int) -> None:
        if page_bytes <= 0 or page_bytes % backend.granularity:
            raise ValueError(f"page_bytes {page_bytes} must be a positive multiple of {backend.granularity}")
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.nbytes = math.prod(self.shape) * torch.empty((), dtype=dtype).element_size()
        if self.nbytes <= 0:
            raise ValueError(f"a VirtualTensor needs at least one byte, shape {tuple(self.shape)}")
        self.backend = backend
        self.page_bytes = int(page_bytes)
        self.num_pages = -(-self.nbytes // self.page_bytes)
        self.reserved_bytes = self.num_pages * self.page_bytes
        self.address = backend.reserve(self.reserved_bytes)
        self._chunks: list[PhysicalChunk | None] = [None] * self.num_pages
        self._num_mapped = 0
        self._tensor: torch.Tensor | None = (
            backend.as_tensor(self.address, self.nbytes).view(dtype).view(self.shape)
        )

    # ---- views ---------------------------------------------------------------------------------
    @property
    def tensor(self) -> torch.Tensor:
        """The shaped view; the same object (same data_ptr) for the VirtualTensor's whole life."""
        if self._tensor is None:
            raise BackendClosed("VirtualTensor used after close()")
        return self._tensor

    def page_address(self, page_index: int) -> int:
        """Virtual address of page `page_index`."""
        self._check_page(page_index)
        return self.address + page_index * self.page_bytes

    def page_tensor(self, page_index: int) -> torch.Tensor:
        """A 1-D uint8 view of one page (for host-buffer copies); includes padding past `nbytes`."""
        self._check_open()
        return self.backend.as_tensor(self.page_address(page_index), self.page_bytes)

    # ---- mapping -------------------------------------------------------------------------------
    def map_page(self, page_index: int, chunk: PhysicalChunk) -> None:
        """Map `chunk` at an unmapped page. chunk.num_mappings += 1."""
        self.map_pages(page_index, [chunk])

    def map_pages(self, start_page: int, chunks: Sequence[PhysicalChunk]) -> None:
        """Map `chunks` at consecutive unmapped pages from `start_page`, with one backend call per
        physically contiguous run. All pages are checked before anything is mapped."""
        self._check_open()
        if not chunks:
            return
        self._check_page(start_page)
        self._check_page(start_page + len(chunks) - 1)
        for offset, chunk in enumerate(chunks):
            if chunk.num_bytes != self.page_bytes:
                raise ValueError(f"chunk of {chunk.num_bytes} bytes cannot back a "
                                 f"{self.page_bytes}-byte page")
            if self._chunks[start_page + offset] is not None:
                raise ValueError(f"page {start_page + offset} is already mapped; unmap it first")
        self.backend.map_run(self.address + start_page * self.page_bytes, chunks)
        self._chunks[start_page:start_page + len(chunks)] = chunks
        self._num_mapped += len(chunks)

    def unmap_page(self, page_index: int) -> PhysicalChunk:
        """Unmap a mapped page and return its chunk (num_mappings -= 1; the chunk is not freed)."""
        self._check_open()
        self._check_page(page_index)
        if self._chunks[page_index] is None:
            raise ValueError(f"page {page_index} is not mapped")
        return self.unmap_pages(page_index, 1)[0]

    def unmap_pages(self, start_page: int, num_pages: int) -> list[PhysicalChunk]:
        """Unmap the mapped pages among [start_page, start_page+num_pages) with one backend call;
        returns their chunks in page order (unmapped pages in the range are skipped)."""
        self._check_open()
        if num_pages <= 0:
            return []
        self._check_page(start_page)
        self._check_page(start_page + num_pages - 1)
        chunks = self.backend.unmap(self.address + start_page * self.page_bytes, num_pages * self.page_bytes)
        for index in range(start_page, start_page + num_pages):
            self._chunks[index] = None
        self._num_mapped -= len(chunks)
        return chunks

    def move_page(self, src_index: int, dst_index: int) -> None:
        """Move the chunk at `src_index` to the unmapped `dst_index` without copying its data;
        `src_index` becomes unmapped."""
        self._check_open()
        self._check_page(src_index)
        self._check_page(dst_index)
        chunk = self._chunks[src_index]
        if chunk is None:
            raise ValueError(f"page {src_index} is not mapped")
        if self._chunks[dst_index] is not None:
            raise ValueError(f"page {dst_index} is already mapped; unmap it first")
        # Map at the destination first: the chunk is never without a mapping, so nothing that
        # watches num_mappings can free it in between.
        self.map_page(dst_index, chunk)
        self.unmap_page(src_index)

    def chunk_at(self, page_index: int) -> PhysicalChunk | None:
        """The chunk mapped at `page_index`, or None."""
        self._check_page(page_index)
        return self._chunks[page_index]

    def is_mapped(self, page_index: int) -> bool:
        """Whether a chunk is mapped at `page_index`."""
        return self.chunk_at(page_index) is not None

    @property
    def num_mapped(self) -> int:
        """How many pages are mapped now."""
        return self._num_mapped

    def mapped_pages(self) -> list[int]:
        """Indices of the mapped pages, ascending."""
        return [index for index, chunk in enumerate(self._chunks) if chunk is not None]

    def close(self) -> None:
        """Unmap every page (chunks are not released: they belong to the pool) and free the
        reservation. `.tensor` raises afterwards; views taken earlier must not be used. Idempotent."""
        if self._tensor is None:
            return
        if not self.backend.is_closed:
            if self._num_mapped:
                self.unmap_pages(0, self.num_pages)
            self.backend.free_reservation(self.address, self.reserved_bytes)
        self._tensor = None

    def __repr__(self) -> str:
        return (f"VirtualTensor(shape={tuple(self.shape)}, dtype={self.dtype}, pages={self._num_mapped}/"
                f"{self.num_pages}x{self.page_bytes}B, backend={self.backend.name})")

    # ---- helpers -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._tensor is None:
            raise BackendClosed("VirtualTensor used after close()")

    def _check_page(self, page_index: int) -> None:
        if not 0 <= page_index < self.num_pages:
            raise IndexError(f"page {page_index} out of range [0, {self.num_pages})")
