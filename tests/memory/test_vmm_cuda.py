"""The CUDA VMM backend. GPU tests carry the `gpu` marker and skip without a GPU or cuda-python."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from memory import BackendUnavailable, ElasticPool, VirtualTensor, create_backend

HAS_CUDA_PYTHON = importlib.util.find_spec("cuda") is not None and (
    importlib.util.find_spec("cuda.bindings") is not None)
HAS_GPU = torch.cuda.is_available() and HAS_CUDA_PYTHON



@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_without_a_gpu_the_cuda_backend_refuses_clearly():
    with pytest.raises(BackendUnavailable, match="cuda-python|driver|GPU"):
        create_backend("cuda")


@pytest.fixture
def cuda():
    backend = create_backend("cuda")
    yield backend
    backend.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and cuda-python")
def test_map_unmap_alias_move_on_the_device(cuda):
    granularity = cuda.granularity
    assert granularity % (2 << 20) == 0  # the driver's minimum on every current NVIDIA GPU
    vt = VirtualTensor(cuda, (4, granularity // 4), torch.float32, granularity)
    assert vt.tensor.device.type == "cuda" and vt.tensor.data_ptr() == vt.address
    unmapped = vt.tensor[1].clone()  # scratch: reads without faulting
    assert unmapped.shape == (granularity // 4,)
    chunk = cuda.create_chunk(granularity)
    vt.map_page(0, chunk)
    vt.tensor[0] = 2.5
    vt.map_page(3, chunk)  # alias
    assert torch.equal(vt.tensor[3], vt.tensor[0]) and chunk.num_mappings == 2
    vt.unmap_page(0)
    vt.move_page(3, 2)
    assert float(vt.tensor[2].min()) == 2.5 and float(vt.tensor[2].max()) == 2.5
    assert vt.tensor.data_ptr() == vt.address
    vt.unmap_page(2)
    cuda.release_chunk(chunk)
    assert cuda.physical_bytes() == 0
    with pytest.raises(ValueError, match="already released"):
        cuda.release_chunk(chunk)
    vt.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs an NVIDIA GPU and cuda-python")
def test_torch_ops_on_device_views_match_plain_tensors(cuda):
    granularity = cuda.granularity
    pool = ElasticPool(cuda, 16 * granularity, granularity)
    pool.register("kv")
    k = VirtualTensor(cuda, (4, 256, 2, 64), torch.float16, granularity)
    v = VirtualTensor(cuda, (4, 256, 2, 64), torch.float16, granularity)
    k.map_pages(0, pool.inflate("kv", k.num_pages))
    v.map_pages(0, pool.inflate("kv", v.num_pages))
    plain_k = torch.randn(4, 256, 2, 64, device="cuda", dtype=torch.float16)
    plain_v = torch.randn(4, 256, 2, 64, device="cuda", dtype=torch.float16)
    k.tensor.copy_(plain_k)
    v.tensor.copy_(plain_v)
    q = torch.randn(3, 2, 1, 64, device="cuda", dtype=torch.float16)
    sdpa = F.scaled_dot_product_attention
    got = sdpa(q, k.tensor[:3, :100].transpose(1, 2), v.tensor[:3, :100].transpose(1, 2))
    want = sdpa(q, plain_k[:3, :100].transpose(1, 2), plain_v[:3, :100].transpose(1, 2))
    assert torch.equal(got, want)
    flat = k.tensor.view(-1, 64)
    assert torch.equal(flat @ flat[:64].T, plain_k.view(-1, 64) @ plain_k.view(-1, 64)[:64].T)
    index = torch.tensor([3, 0, 2], device="cuda")
    assert torch.equal(k.tensor.index_select(0, index), plain_k.index_select(0, index))
    for tensor in (k, v):
        pool.deflate("kv", tensor.unmap_pages(0, tensor.num_pages))
        tensor.close()
    num_alive = pool.num_alive
    assert num_alive == k.num_pages + v.num_pages and pool.trim() == num_alive
    assert cuda.physical_bytes() == 0
    pool.close()
