"""HostBuffer: slots of host RAM, allocated lowest-first, with page copies to and from the device."""

from __future__ import annotations

import os

import pytest
import torch

from memory import HostBuffer, HostBufferFull, VirtualTensor

PAGE = os.sysconf("SC_PAGE_SIZE")


def test_slots_are_allocated_lowest_first_all_or_nothing():
    buffer = HostBuffer(5 * PAGE + 7, PAGE)
    assert (buffer.num_slots, buffer.capacity_bytes, buffer.num_free) == (5, 5 * PAGE, 5)
    assert not buffer.is_pinned
    assert buffer.allocate(3) == [0, 1, 2]
    with pytest.raises(HostBufferFull) as info:
        buffer.allocate(3)
    assert (info.value.requested, info.value.available) == (3, 2)
    assert buffer.num_free == 2 and buffer.used_bytes == 3 * PAGE
    buffer.free([1])
    assert buffer.allocate(2) == [1, 3]
    with pytest.raises(ValueError, match="not allocated"):
        buffer.free([4])
    with pytest.raises(ValueError, match="same slot twice"):
        buffer.free([3, 3])
    buffer.free([0])
    with pytest.raises(ValueError, match="not allocated"):
        buffer.free([2, 0])  # double free: checked before anything is freed
    assert buffer.num_free == 2
    with pytest.raises(IndexError):
        buffer.view(5)


def test_pages_round_trip_between_a_virtual_tensor_and_the_buffer(host):
    vt = VirtualTensor(host, (4, PAGE // 2), torch.float16, PAGE)
    vt.map_pages(0, [host.create_chunk(PAGE) for _ in range(2)])
    vt.tensor[0] = torch.linspace(-1, 1, PAGE // 2, dtype=torch.float16)
    buffer = HostBuffer(4 * PAGE, PAGE)
    (slot,) = buffer.allocate(1)
    page = vt.page_tensor(0)
    assert page.data_ptr() == vt.address and page.numel() == PAGE
    buffer.copy_in(slot, page)
    assert torch.equal(buffer.view(slot).view(torch.float16), vt.tensor[0])
    buffer.copy_out(slot, vt.tensor[1])  # a typed row is one page too
    assert torch.equal(vt.tensor[1], vt.tensor[0])
    buffer.view(slot)[0] = 1
    assert int(buffer.view(slot)[0]) == 1  # a view, not a copy
    with pytest.raises(ValueError, match="not one"):
        buffer.copy_in(slot, vt.tensor[:2])
    with pytest.raises(ValueError, match="contiguous"):
        buffer.copy_out(slot, torch.empty(2, PAGE, dtype=torch.uint8)[:, ::2])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_buffer_for_cuda_is_pinned_and_copies_asynchronously():
    buffer = HostBuffer(4 << 20, 2 << 20, "cuda")
    assert buffer.is_pinned and buffer.view(buffer.allocate(1)[0]).is_pinned()
    page = torch.arange(2 << 20, dtype=torch.int64, device="cuda").to(torch.uint8)
    buffer.copy_in(0, page)
    out = torch.empty_like(page)
    buffer.copy_out(0, out)
    torch.cuda.synchronize()
    assert torch.equal(out, page)
