"""VirtualTensor: stable data pointer, page mapping, aliasing, copy-free moves, zero-copy torch ops."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from memory import BackendClosed, ElasticPool, PoolExhausted, VirtualTensor

PAGE = os.sysconf("SC_PAGE_SIZE")
PAGE_BYTES = 4 * PAGE


def _mapped_everywhere(backend, shape, dtype, page_bytes=PAGE_BYTES):
    tensor = VirtualTensor(backend, shape, dtype, page_bytes)
    tensor.map_pages(0, [backend.create_chunk(page_bytes) for _ in range(tensor.num_pages)])
    return tensor


def test_shape_pages_and_stable_data_pointer(host):
    vt = VirtualTensor(host, (3, 5, 7), torch.float16, PAGE_BYTES)
    assert vt.nbytes == 3 * 5 * 7 * 2
    assert vt.num_pages == 1 and vt.reserved_bytes == PAGE_BYTES
    big = VirtualTensor(host, (10, PAGE_BYTES // 4 + 1), torch.float32, PAGE_BYTES)
    assert big.num_pages == -(-10 * (PAGE_BYTES + 4) // PAGE_BYTES) == 11
    pointer = big.tensor.data_ptr()
    assert pointer == big.address
    assert big.tensor.shape == (10, PAGE_BYTES // 4 + 1) and big.tensor.dtype == torch.float32
    chunks = [host.create_chunk(PAGE_BYTES) for _ in range(3)]
    big.map_pages(4, chunks)
    big.move_page(5, 9)
    big.unmap_page(4)
    assert big.tensor.data_ptr() == pointer and big.tensor is big.tensor
    assert big.mapped_pages() == [6, 9] and big.num_mapped == 2


def test_unmapped_pages_read_zeros_and_data_survives_other_pages_changing(host):
    vt = VirtualTensor(host, (8, PAGE_BYTES // 4), torch.float32, PAGE_BYTES)
    assert torch.equal(vt.tensor, torch.zeros(8, PAGE_BYTES // 4))
    chunks = [host.create_chunk(PAGE_BYTES) for _ in range(4)]
    vt.map_page(2, chunks[0])
    vt.tensor[2] = torch.arange(PAGE_BYTES // 4, dtype=torch.float32)
    vt.map_pages(5, chunks[1:])
    vt.tensor[5:8] = -1.0
    vt.unmap_pages(5, 3)
    vt.map_page(3, chunks[2])
    vt.unmap_page(3)
    assert torch.equal(vt.tensor[2], torch.arange(PAGE_BYTES // 4, dtype=torch.float32))
    assert int(vt.tensor[[0, 1, 3, 4, 5, 6, 7]].count_nonzero()) == 0


def test_move_page_remaps_without_copying(host):
    vt = VirtualTensor(host, (4, PAGE_BYTES), torch.uint8, PAGE_BYTES)
    chunk = host.create_chunk(PAGE_BYTES)
    vt.map_page(0, chunk)
    vt.tensor[0] = 42
    vt.move_page(0, 3)
    assert vt.chunk_at(3) is chunk and vt.chunk_at(0) is None and chunk.num_mappings == 1
    assert int(vt.tensor[3].min()) == 42 and int(vt.tensor[0].max()) == 0
    # The same physical bytes, not a copy: a write through another alias shows up here.
    other = VirtualTensor(host, (PAGE_BYTES,), torch.uint8, PAGE_BYTES)
    other.map_page(0, chunk)
    other.tensor[17] = 1
    assert int(vt.tensor[3, 17]) == 1 and chunk.num_mappings == 2


def test_prefix_sharing_maps_one_chunk_into_two_tensors(host):
    first = VirtualTensor(host, (2, PAGE_BYTES // 2), torch.int16, PAGE_BYTES)
    second = VirtualTensor(host, (2, PAGE_BYTES // 2), torch.int16, PAGE_BYTES)
    shared = host.create_chunk(PAGE_BYTES)
    first.map_page(0, shared)
    second.map_page(1, shared)
    first.tensor[0] = torch.arange(PAGE_BYTES // 2, dtype=torch.int16)
    assert torch.equal(second.tensor[1], first.tensor[0])
    assert shared.num_mappings == 2
    assert first.unmap_page(0) is shared and shared.num_mappings == 1
    assert torch.equal(second.tensor[1], torch.arange(PAGE_BYTES // 2, dtype=torch.int16))


def test_map_pages_merges_contiguous_chunks_into_one_kernel_mapping(host, num_vmas_in):
    vt = VirtualTensor(host, (200 * PAGE_BYTES,), torch.uint8, PAGE_BYTES)
    chunks = [host.create_chunk(PAGE_BYTES) for _ in range(200)]
    vt.map_pages(0, chunks)
    assert num_vmas_in(vt.address, vt.address + vt.reserved_bytes) == 1
    assert [vt.chunk_at(i) for i in range(200)] == chunks


def test_torch_ops_on_virtual_views_match_plain_tensors(host):
    torch.manual_seed(0)
    a = _mapped_everywhere(host, (64, 96), torch.float32)
    b = _mapped_everywhere(host, (96, 48), torch.float32)
    plain_a, plain_b = torch.randn(64, 96), torch.randn(96, 48)
    a.tensor.copy_(plain_a)
    b.tensor.copy_(plain_b)
    assert torch.equal(a.tensor @ b.tensor, plain_a @ plain_b)
    index = torch.tensor([5, 0, 63, 5, 17])
    assert torch.equal(a.tensor.index_select(0, index), plain_a.index_select(0, index))
    # Attention over a strided slice of a [slots, len, heads, dim] cache, as the KV cache does it.
    k = _mapped_everywhere(host, (4, 32, 2, 16), torch.float32)
    v = _mapped_everywhere(host, (4, 32, 2, 16), torch.float32)
    plain_k, plain_v = torch.randn(4, 32, 2, 16), torch.randn(4, 32, 2, 16)
    k.tensor.copy_(plain_k)
    v.tensor.copy_(plain_v)
    q = torch.randn(3, 2, 1, 16)
    window = (slice(0, 3), slice(0, 20))
    sdpa = F.scaled_dot_product_attention
    got = sdpa(q, k.tensor[window].transpose(1, 2), v.tensor[window].transpose(1, 2))
    want = sdpa(q, plain_k[window].transpose(1, 2), plain_v[window].transpose(1, 2))
    assert torch.equal(got, want)
    assert k.tensor[:3, :20].data_ptr() == k.address  # a view, not a copy


def test_misuse_raises(host):
    with pytest.raises(ValueError, match="multiple of"):
        VirtualTensor(host, (4,), torch.float32, PAGE + 1)
    with pytest.raises(ValueError, match="at least one byte"):
        VirtualTensor(host, (0, 4), torch.float32, PAGE)
    vt = VirtualTensor(host, (4, PAGE_BYTES), torch.uint8, PAGE_BYTES)
    chunk = host.create_chunk(PAGE_BYTES)
    with pytest.raises(ValueError, match="cannot back"):
        vt.map_page(0, host.create_chunk(PAGE))
    with pytest.raises(IndexError):
        vt.map_page(4, chunk)
    with pytest.raises(IndexError):
        vt.map_pages(3, [chunk, host.create_chunk(PAGE_BYTES)])
    with pytest.raises(ValueError, match="not mapped"):
        vt.unmap_page(1)
    with pytest.raises(ValueError, match="not mapped"):
        vt.move_page(1, 2)
    vt.map_page(1, chunk)
    with pytest.raises(ValueError, match="already mapped"):
        vt.map_page(1, chunk)
    vt.map_page(2, chunk)
    with pytest.raises(ValueError, match="already mapped"):
        vt.move_page(1, 2)
    assert chunk.num_mappings == 2 and vt.mapped_pages() == [1, 2]
    vt.close()
    assert chunk.num_mappings == 0
    with pytest.raises(BackendClosed):
        _ = vt.tensor
    with pytest.raises(BackendClosed):
        vt.map_page(0, chunk)
    vt.close()


def test_sim_backend_runs_the_pool_at_gpu_scale(sim):
    """80 GB of 2 MiB chunks: bookkeeping only, meta tensors, exact counts."""
    pool = ElasticPool(sim, budget_bytes=80 << 30, chunk_bytes=2 << 20)
    pool.register("kv")
    assert pool.num_chunks == 40960
    cache = VirtualTensor(sim, (512, 131072, 8, 128), torch.bfloat16, 2 << 20)  # 128 GiB virtual
    assert cache.tensor.device.type == "meta" and cache.num_pages == 65536
    chunks = pool.inflate("kv", 40960)
    with pytest.raises(PoolExhausted):
        pool.inflate("kv", 1)
    cache.map_pages(0, chunks[:20000])
    cache.map_pages(30000, chunks[20000:])
    assert cache.num_mapped == 40960 and sim.physical_bytes() == 80 << 30
    cache.move_page(0, 29999)
    pool.deflate("kv", cache.unmap_pages(0, 50000))
    assert pool.num_free() == 40000 and pool.num_held("kv") == 960
    assert pool.trim() == 40000
    assert sim.physical_bytes() == 960 * (2 << 20)
