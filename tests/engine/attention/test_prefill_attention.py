"""The native bf16 prefill kernel (csrc/prefill_attention.c) against scaled_dot_product_attention: every
prompt chunk of a step in one call, chunks that start at 0 or after cached tokens, key ranges longer than
one key block (the online softmax), sliding windows, GQA groups up to 8, head dims 64 and 256, q as a strided
view of the fused qkv buffer, rows after decode rows, on vdpbf16ps and on AMX tiles; the paged layout gives
the contiguous layout's bits; shapes it does not take fall back to SDPA. Needs an AVX512-BF16 CPU (skipped
elsewhere: SDPA serves there)."""

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

LIBRARY = native.load_prefill_kernel()
pytestmark = pytest.mark.skipif(LIBRARY is None, reason="the prefill kernel needs AVX512-BF16")

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


def _inputs(shape, seed=0):
    kv_heads, heads, head_dim = shape
    generator = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(NUM_SLOTS, MAX_LEN, kv_heads, head_dim, generator=generator).to(torch.bfloat16)
                    for _ in "kv")
    rows = DECODE_ROWS + sum(count for _, _, count in CHUNKS)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator).to(torch.bfloat16)
    query = qkv[:, : heads * head_dim].view(rows, heads, head_dim)  # a strided view, as the model passes it
    return query, keys, values


def _chunk_rows(batch: ForwardBatch) -> slice:
    return slice(DECODE_ROWS, batch.num_tokens)


@pytest.fixture(params=["vector", "tiles"])
def routine(request):
    """The kernel's products on vdpbf16ps, then on AMX tiles (where the CPU and the OS give them)."""
    if request.param == "tiles" and not LIBRARY.prefill_attention_set_tiles(1):
        pytest.skip("no AMX tiles here")
    LIBRARY.prefill_attention_set_tiles(int(request.param == "tiles"))
    yield request.param
    LIBRARY.prefill_attention_set_tiles(int(native.amx_tiles_allowed()))


@pytest.mark.parametrize("window", [None, 7, 100])
# SmolLM2 (3/9/64), Gemma 3 (1/4/256), the largest group the kernel takes (1/8/64)
@pytest.mark.parametrize("shape", [(3, 9, 64), (1, 4, 256), (1, 8, 64)])
def test_prefill_kernel_equals_sdpa(window, shape, routine):
    kv_heads, heads, head_dim = shape
    query, keys, values = _inputs(shape)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, window)
    got = torch.full((batch.num_tokens, heads, head_dim), float("nan"), dtype=torch.bfloat16)
    assert native.prefill_in_place(LIBRARY, spec, query, keys, values, None, batch, got)
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


@pytest.mark.parametrize("page_tokens", [5, 16])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_prefill_reads_pages_in_place_with_the_contiguous_bits(page_tokens, window, routine):
    """Pages at shuffled indices (every page no table points at is NaN): the same bits as the contiguous
    cache, through the backend's `_prefills` (the path the model takes)."""
    shape = kv_heads, heads, head_dim = (3, 9, 64)
    query, keys, values = _inputs(shape, seed=1)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, window)
    pages_per_slot = -(-MAX_LEN // page_tokens)
    order = torch.randperm(NUM_SLOTS * pages_per_slot, generator=torch.Generator().manual_seed(2)) + 1
    table = order.view(NUM_SLOTS, pages_per_slot)
    paged = []
    for dense in (keys, values):
        pages = torch.full((NUM_SLOTS * pages_per_slot + 1, page_tokens, kv_heads, head_dim), float("nan"),
                           dtype=torch.bfloat16)
        padded = torch.zeros(NUM_SLOTS, pages_per_slot * page_tokens, kv_heads, head_dim, dtype=torch.bfloat16)
        padded[:, :MAX_LEN] = dense
        pages[table.flatten()] = padded.view(-1, page_tokens, kv_heads, head_dim)
        paged.append(PagedLayerCache(pages, table))
    contiguous = torch.empty(batch.num_tokens, heads, head_dim, dtype=torch.bfloat16)
    NativeDecodeBackend()._prefills(spec, query, keys, values, batch, contiguous)
    got = torch.empty_like(contiguous)
    k_rows, v_rows = (torch.zeros(batch.num_tokens, kv_heads, head_dim, dtype=torch.bfloat16) for _ in "kv")
    PagedNativeBackend(NativeDecodeBackend())._prefills(spec, query, k_rows, v_rows, paged[0], paged[1], batch, got)
    rows = _chunk_rows(batch)
    assert torch.equal(got[rows], contiguous[rows])


def test_shapes_the_kernel_does_not_take_fall_back_to_sdpa():
    """head_dim 16 (not a multiple of 64) and fp32: `prefill_in_place` declines, the backend runs SDPA."""
    shape = kv_heads, heads, head_dim = (3, 9, 16)
    query, keys, values = _inputs(shape)
    batch, spec = _batch(), LayerAttentionSpec(heads, kv_heads, head_dim, None)
    out = torch.empty(batch.num_tokens, heads, head_dim, dtype=torch.bfloat16)
    assert not native.prefill_in_place(LIBRARY, spec, query, keys, values, None, batch, out)
    got, expected = torch.empty_like(out), torch.empty_like(out)
    NativeDecodeBackend()._prefills(spec, query, keys, values, batch, got)
    TorchSdpaBackend()._prefills(spec, query, keys, values, batch, expected)
    assert torch.equal(got[_chunk_rows(batch)], expected[_chunk_rows(batch)])
    q32, k32, v32 = query.float(), keys.float(), values.float()
    assert not native.prefill_in_place(LIBRARY, spec, q32, k32, v32, None, batch, torch.empty(out.shape))
