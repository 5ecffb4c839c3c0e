"""The native prefill kernels against scaled_dot_product_attention: bf16 (csrc/prefill_attention.c, on
vdpbf16ps and on AMX tiles; needs an AVX512-BF16 CPU) and fp32 (csrc/prefill_attention_f32.c; needs AVX2/FMA).
Every prompt chunk of a step in one call, chunks that start at 0 or after cached tokens, key ranges longer than
one key block (the online softmax), sliding windows, GQA groups up to 8, head dims 64 and 256, q as a strided
view of the fused qkv buffer, rows after decode rows; the paged layout gives the contiguous layout's bits;
shapes a kernel does not take fall back to SDPA. Each test is skipped where its kernel is not built (SDPA
serves there)."""

from __future__ import annotations

import pytest
import torch

from engine.attention import native
from engine.attention.base import LayerAttentionSpec
from engine.attention.native_decode import NativeDecodeBackend
from engine.attention.paged_native import PagedNativeBackend
from engine.attention.torch_sdpa import TorchSdpaBackend
from engine.core.forward_batch import ForwardBatch, PrefillChunk
from memory.kv.paged import PagedLayerCache

KERNELS = native.load_prefill_kernels()
needs_bf16 = pytest.mark.skipif(torch.bfloat16 not in KERNELS, reason="the bf16 prefill kernel needs AVX512-BF16")
needs_f32 = pytest.mark.skipif(torch.float32 not in KERNELS, reason="the fp32 prefill kernel needs AVX2/FMA")

NUM_SLOTS, MAX_LEN, DECODE_ROWS = 8, 320, 3
# (slot, start position, tokens): a whole 128-token prompt, a chunk after 40 cached tokens, a chunk whose
# keys span three key blocks (200 cached + 70 new), a one-token chunk, an odd-sized prompt
CHUNKS = [(3, 0, 128), (0, 40, 70), (5, 200, 70), (6, 17, 1), (1, 0, 37)]


def _batch() -> ForwardBatch:
    prefills, offset, slots, positions = [], DECODE_ROWS, [7] * DECODE_ROWS, [0] * DECODE_ROWS
    for slot, start, count in CHUNKS:
        prefills.append(PrefillChunk(slot, start, count, offset))
        offset += count
        slots += [slot] * count
        positions += list(range(start, start + count))
    return ForwardBatch(
        input_ids=torch.zeros(offset, dtype=torch.long), positions=torch.tensor(positions),
        token_slots=torch.tensor(slots), num_decode_tokens=DECODE_ROWS, decode_slots=torch.tensor([7] * DECODE_ROWS),
        decode_context_lens=torch.ones(DECODE_ROWS, dtype=torch.long), decode_slots_are_prefix=False,
        max_decode_context_len=1, prefills=tuple(prefills), logits_indices=torch.arange(len(CHUNKS)))


def _inputs(shape, seed=0, dtype=torch.bfloat16):
    kv_heads, heads, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(NUM_SLOTS, MAX_LEN, kv_heads, head_dim, generator=generator).to(dtype)
                    for _ in "kv")
    rows = DECODE_ROWS + sum(count for _, _, count in CHUNKS)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator).to(dtype)
    query = qkv[:, : heads * head_dim].view(rows, heads, head_dim)  # a strided view, as the model passes it
    return query, keys, values


def _chunk_rows(batch: ForwardBatch) -> slice:
    return slice(DECODE_ROWS, batch.num_tokens)


@pytest.fixture(params=["vector", "tiles"])
def routine(request):
    """The kernel's products on vdpbf16ps, then on AMX tiles (where the CPU and the OS give them)."""
    if request.param == "tiles" and not native.set_prefill_tiles(True):
        pytest.skip("no AMX tiles here")
    native.set_prefill_tiles(request.param == "tiles")
    yield request.param
    native.set_prefill_tiles(native.amx_tiles_allowed())


@needs_bf16
@pytest.mark.parametrize("window", [None, 7, 100])
# SmolLM2 (3/9/64), Gemma 3 (1/4/256), the largest group the kernel takes (1/8/64)
@pytest.mark.parametrize("shape", [(3, 9, 64), (1, 4, 256), (1, 8, 64)])
def test_prefill_kernel_equals_sdpa(window, shape, routine):
    kv_heads, heads, head_dim = shape
    query, keys, values = _inputs(shape)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, window)
    got = torch.full((batch.num_tokens, heads, head_dim), float("nan"), dtype=torch.bfloat16)
    assert native.prefill_in_place(KERNELS, spec, query, keys, values, None, batch, got)
    expected = torch.empty_like(got)
    TorchSdpaBackend()._prefills(spec, query, keys, values, batch, expected)  # bf16 SDPA, as served before
    exact = torch.empty(got.shape)
    TorchSdpaBackend()._prefills(spec, query.float(), keys.float(), values.float(), batch, exact)
    rows = _chunk_rows(batch)
    assert torch.isnan(got[:DECODE_ROWS]).all()  # decode rows are not the prefill kernel's
    torch.testing.assert_close(got[rows].float(), expected[rows].float(), atol=2e-2, rtol=2e-2)
    # no further from fp32 attention of the same bf16 inputs than SDPA in bf16 is
    error, sdpa_error = ((out[rows].float() - exact[rows]).abs().max() for out in (got, expected))
    assert error <= max(sdpa_error * 1.5, 4e-3)


@pytest.fixture(params=[pytest.param(torch.bfloat16, marks=needs_bf16), pytest.param(torch.float32, marks=needs_f32)])
def dtype(request):
    return request.param


@pytest.mark.parametrize("page_tokens", [5, 16])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_prefill_reads_pages_in_place_with_the_contiguous_bits(page_tokens, window, dtype):
    """Pages at shuffled indices (every page no table points at is NaN): the same bits as the contiguous
    cache, through the backend's `_prefills` (the path the model takes)."""
    shape = kv_heads, heads, head_dim = (3, 9, 64)
    query, keys, values = _inputs(shape, seed=1, dtype=dtype)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, window)
    pages_per_slot = -(-MAX_LEN // page_tokens)
    order = torch.randperm(NUM_SLOTS * pages_per_slot, generator=torch.Generator().manual_seed(2)) + 1
    table = order.view(NUM_SLOTS, pages_per_slot)
    paged = []
    for dense in (keys, values):
        pages = torch.full((NUM_SLOTS * pages_per_slot + 1, page_tokens, kv_heads, head_dim), float("nan"),
                           dtype=dtype)
        padded = torch.zeros(NUM_SLOTS, pages_per_slot * page_tokens, kv_heads, head_dim, dtype=dtype)
        padded[:, :MAX_LEN] = dense
        pages[table.flatten()] = padded.view(-1, page_tokens, kv_heads, head_dim)
        paged.append(PagedLayerCache(pages, table))
    contiguous = torch.empty(batch.num_tokens, heads, head_dim, dtype=dtype)
    NativeDecodeBackend()._prefills(spec, query, keys, values, batch, contiguous)
    got = torch.empty_like(contiguous)
    k_rows, v_rows = (torch.zeros(batch.num_tokens, kv_heads, head_dim, dtype=dtype) for _ in "kv")
    PagedNativeBackend(NativeDecodeBackend())._prefills(spec, query, k_rows, v_rows, paged[0], paged[1], batch, got)
    rows = _chunk_rows(batch)
    assert torch.equal(got[rows], contiguous[rows])


@needs_f32
@pytest.mark.parametrize("window", [None, 7, 100])
@pytest.mark.parametrize("shape", [(3, 9, 64), (1, 4, 256), (1, 8, 64), (2, 6, 32)])
def test_f32_prefill_kernel_equals_sdpa(window, shape):
    """fp32: the same attention as SDPA in fp32 up to the order of the sums (every prompt row written, decode
    rows not)."""
    kv_heads, heads, head_dim = shape
    query, keys, values = _inputs(shape, dtype=torch.float32)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, window)
    got = torch.full((batch.num_tokens, heads, head_dim), float("nan"))
    assert native.prefill_in_place(KERNELS, spec, query, keys, values, None, batch, got)
    expected = torch.empty_like(got)
    TorchSdpaBackend()._prefills(spec, query, keys, values, batch, expected)
    rows = _chunk_rows(batch)
    assert torch.isnan(got[:DECODE_ROWS]).all()
    torch.testing.assert_close(got[rows], expected[rows], atol=2e-6, rtol=1e-5)


def test_shapes_the_kernels_do_not_take_fall_back_to_sdpa(dtype):
    """head_dim 16 (bf16 takes multiples of 64, fp32 of 32), and a dtype with no kernel (fp16):
    `prefill_in_place` declines, the backend runs SDPA."""
    shape = kv_heads, heads, head_dim = (3, 9, 16)
    query, keys, values = _inputs(shape, dtype=dtype)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, None)
    out = torch.empty(batch.num_tokens, heads, head_dim, dtype=dtype)
    assert not native.prefill_in_place(KERNELS, spec, query, keys, values, None, batch, out)
    got, expected = torch.empty_like(out), torch.empty_like(out)
    NativeDecodeBackend()._prefills(spec, query, keys, values, batch, got)
    TorchSdpaBackend()._prefills(spec, query, keys, values, batch, expected)
    assert torch.equal(got[_chunk_rows(batch)], expected[_chunk_rows(batch)])
    q32, k32, v32 = query.float(), keys.float(), values.float()
    assert not native.prefill_in_place(KERNELS, spec, q32, k32, v32, None, batch, torch.empty(out.shape))
