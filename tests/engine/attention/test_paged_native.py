"""The native kernels read and write the `paged` layout in place through block tables: decode equals the
contiguous layout's kernel bit for bit (and sdpa within tolerance) with odd page sizes, partial last pages,
sequences of different lengths, sliding windows, fp32 and bf16, also when built for AVX2 only; the store
puts exactly what the torch paged store puts and refuses pages the slot does not hold."""

from __future__ import annotations

import platform

import pytest
import torch

from engine.attention import native
from engine.attention.base import LayerAttentionSpec
from engine.attention.native_decode import NativeDecodeBackend
from engine.attention.paged_native import PagedNativeBackend
from engine.attention.paged_torch import PagedTorchBackend
from engine.attention.torch_sdpa import TorchSdpaBackend
from engine.core.forward_batch import ForwardBatch, PrefillChunk
from memory.kv.paged import PagedLayerCache

NUM_SLOTS, PAGES_PER_SLOT = 6, 24
AVX2_FLAGS = tuple("-march=haswell" if flag == "-march=native" else flag for flag in native.FLAGS)


def _paged_cache(lens, slots, page_tokens, kv_heads, head_dim, dtype, window, seed=0):
    """Random paged K and V whose tables give each sequence the pages it holds at shuffled page indices, and
    the same tokens as a dense [NUM_SLOTS, max_len, kvh, d] copy. The null page and every page no table
    points at hold NaN: a read of anything the sequence does not hold poisons the output."""
    generator = torch.Generator().manual_seed(seed)
    num_pages = NUM_SLOTS * PAGES_PER_SLOT + 1
    shape = (num_pages, page_tokens, kv_heads, head_dim)
    caches, table = [], torch.zeros(NUM_SLOTS, PAGES_PER_SLOT, dtype=torch.int64)
    free = (torch.randperm(num_pages - 1, generator=generator) + 1).tolist()
    for slot, length in zip(slots.tolist(), lens.tolist(), strict=True):
        first = max(0, length - window) // page_tokens if window else 0  # pages slid out of the window: null
        for page in range(first, -(-length // page_tokens)):
            table[slot, page] = free.pop()
    for _ in "kv":
        pages = torch.full(shape, float("nan"), dtype=dtype)
        held = table[table > 0]
        pages[held] = torch.randn(held.shape[0], *shape[1:], generator=generator).to(dtype)
        dense = torch.zeros(NUM_SLOTS, PAGES_PER_SLOT * page_tokens, kv_heads, head_dim, dtype=dtype)
        for slot, length in zip(slots.tolist(), lens.tolist(), strict=True):
            start = max(0, length - window) if window else 0
            t = torch.arange(start, length)
            dense[slot, start:length] = pages[table[slot, t // page_tokens], t % page_tokens]
        caches.append((PagedLayerCache(pages, table), dense))
    return caches


def _decode_batch(slots, lens) -> ForwardBatch:
    count = slots.shape[0]
    return ForwardBatch(
        input_ids=torch.zeros(count, dtype=torch.long), positions=lens - 1, token_slots=slots,
        num_decode_tokens=count, decode_slots=slots, decode_context_lens=lens,
        decode_slots_are_prefix=bool(torch.equal(slots, torch.arange(count))),
        max_decode_context_len=int(lens.max()), prefills=(), logits_indices=torch.arange(count))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("page_tokens", [1, 5, 16])
@pytest.mark.parametrize("window", [None, 7])
# SmolLM2's heads (3/9/64: the AVX512-BF16 path), Gemma 3's (1/4/256), and the generic loop's (3/9/16)
@pytest.mark.parametrize("shape", [(3, 9, 64), (1, 4, 256), (3, 9, 16)])
def test_paged_decode_equals_contiguous_kernel(dtype, page_tokens, window, shape):
    kv_heads, heads, head_dim = shape
    slots = torch.tensor([4, 0, 2, 5, 1])  # not in order, one slot unused
    lens = torch.tensor([1, 2 * page_tokens, 2 * page_tokens + 1, 23, 9 * page_tokens - 1])
    (keys, dense_keys), (values, dense_values) = _paged_cache(lens, slots, page_tokens, kv_heads, head_dim, dtype,
                                                              window)
    query = torch.randn(slots.shape[0], heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    spec = LayerAttentionSpec(heads, kv_heads, head_dim, window)
    library = native.load_decode_kernels()
    got, contiguous, reference = (torch.empty(slots.shape[0], heads, head_dim) for _ in range(3))
    native.decode_in_place(library, spec, query, keys.pages, values.pages, keys.block_table, slots, lens, got)
    native.decode_in_place(library, spec, query, dense_keys, dense_values, None, slots, lens, contiguous)
    assert torch.equal(got, contiguous)
    batch = _decode_batch(slots, lens)
    TorchSdpaBackend()._decode(spec, query.float(), dense_keys.float(), dense_values.float(), batch, reference)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, reference, atol=tolerance, rtol=tolerance)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds for Haswell (AVX2, no AVX-512)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_avx2_only_build_reads_pages_like_the_native_build(dtype):
    """The kernels built without AVX-512 (fp32 auto-vectorised, bf16 widened in the generic loop) give what
    the build for this machine gives, within tolerance (bit for bit in fp32 is not promised: the vector
    widths differ)."""
    kv_heads, heads, head_dim, page_tokens = 3, 9, 64, 5
    slots, lens = torch.tensor([2, 0, 3]), torch.tensor([4, 17, 31])
    (keys, _), (values, _) = _paged_cache(lens, slots, page_tokens, kv_heads, head_dim, dtype, None)
    query = torch.randn(3, heads, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    spec = LayerAttentionSpec(heads, kv_heads, head_dim, None)
    outputs = []
    for library in (native.load_decode_kernels(), native.load_decode_kernels(AVX2_FLAGS)):
        outputs.append(torch.empty(3, heads, head_dim))
        native.decode_in_place(library, spec, query, keys.pages, values.pages, keys.block_table, slots, lens,
                               outputs[-1])
    assert not outputs[1].isnan().any()
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def _store_batch(slots, positions) -> ForwardBatch:
    return ForwardBatch(input_ids=torch.zeros(slots.shape[0], dtype=torch.long), positions=positions,
                        token_slots=slots, num_decode_tokens=0, decode_slots=slots[:0],
                        decode_context_lens=positions[:0], decode_slots_are_prefix=True, max_decode_context_len=0,
                        prefills=(), logits_indices=torch.arange(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_store_equals_torch_and_refuses_pages_not_held(dtype):
    page_tokens, kv_heads, head_dim = 3, 3, 16
    lens, held_slots = torch.tensor([7, 4]), torch.tensor([1, 3])
    (cache, _), _ = _paged_cache(lens, held_slots, page_tokens, kv_heads, head_dim, dtype, None)
    cache.pages[0] = 0  # as the layout's null page reads
    expected = PagedLayerCache(cache.pages.clone(), cache.block_table)
    slots, positions = torch.tensor([1, 3, 1, 1]), torch.tensor([6, 3, 0, 3])  # last page partial, page boundary
    qkv = torch.randn(4, 5 * kv_heads * head_dim).to(dtype)
    rows = qkv[:, 3 * head_dim : 6 * head_dim].view(4, kv_heads, head_dim)  # a strided view, as the model passes it
    backend = PagedNativeBackend(NativeDecodeBackend())
    backend._store(cache, _store_batch(slots, positions), rows)
    PagedTorchBackend()._store(expected, _store_batch(slots, positions), rows)
    assert torch.equal(cache.pages.nan_to_num(), expected.pages.nan_to_num())
    before = cache.pages.clone()
    for bad_slot, bad_position in ((3, 6), (0, 0), (1, PAGES_PER_SLOT * page_tokens), (NUM_SLOTS, 0)):
        with pytest.raises(IndexError, match="row 1"):
            backend._store(cache, _store_batch(torch.tensor([1, bad_slot]), torch.tensor([2, bad_position])), rows[:2])
    assert torch.equal(cache.pages.nan_to_num(), before.nan_to_num())  # a refused store writes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 6])
def test_paged_forward_equals_contiguous_forward_on_a_mixed_step(dtype, window):
    """One step of two decodes, a prompt's first chunk (attends to its own K/V) and a chunk after cached
    tokens (gathers its pages): the paged native backend writes the same K/V and gives the same output, bit
    for bit, as the contiguous native backend on the same tokens."""
    page_tokens, kv_heads, heads, head_dim = 5, 3, 9, 64
    slots, lens = torch.tensor([3, 0, 5, 1]), torch.tensor([12, 7, 9, 14])  # after the step
    (keys, dense_keys), (values, dense_values) = _paged_cache(lens, slots, page_tokens, kv_heads, head_dim, dtype,
                                                              None)
    generator = torch.Generator().manual_seed(2)
    first, later = 9, 6  # slot 5: tokens 0-8 new; slot 1: tokens 8-13 new after 8 cached
    positions = torch.cat([lens[:2] - 1, torch.arange(first), torch.arange(14 - later, 14)])
    batch = ForwardBatch(
        input_ids=torch.zeros(17, dtype=torch.long), positions=positions,
        token_slots=torch.cat([slots[:2], torch.full((first,), 5), torch.full((later,), 1)]), num_decode_tokens=2,
        decode_slots=slots[:2], decode_context_lens=lens[:2], decode_slots_are_prefix=False,
        max_decode_context_len=12, logits_indices=torch.tensor([0, 1, 10, 16]),
        prefills=(PrefillChunk(5, 0, first, 2), PrefillChunk(1, 14 - later, later, 2 + first)))
    q = torch.randn(17, heads, head_dim, generator=generator).to(dtype)
    k, v = (torch.randn(17, kv_heads, head_dim, generator=generator).to(dtype) for _ in "kv")
    spec = LayerAttentionSpec(heads, kv_heads, head_dim, window)
    dense = NativeDecodeBackend()
    got, expected = torch.empty_like(q), torch.empty_like(q)
    PagedNativeBackend(dense).forward(spec, q, k, v, keys, values, batch, got)
    dense.forward(spec, q, k, v, dense_keys, dense_values, batch, expected)
    assert torch.equal(got, expected)
    for paged, contiguous in ((keys, dense_keys), (values, dense_values)):
        pages, offsets = paged.block_table[batch.token_slots, positions // page_tokens], positions % page_tokens
        assert torch.equal(paged.pages[pages, offsets], contiguous[batch.token_slots, positions])
