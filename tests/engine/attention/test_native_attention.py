"""The native decode kernel equals the torch sdpa backend on the same cache views."""

from __future__ import annotations

import pytest
import torch

from engine.attention import create_attention_backend
from engine.attention.base import LayerAttentionSpec
from engine.core.forward_batch import ForwardBatch


def _decode_batch(slots: torch.Tensor, lens: torch.Tensor) -> ForwardBatch:
    count = slots.shape[0]
    return ForwardBatch(
        input_ids=torch.zeros(count, dtype=torch.long), positions=lens - 1, token_slots=slots,
        num_decode_tokens=count, decode_slots=slots, decode_context_lens=lens,
        decode_slots_are_prefix=bool(torch.equal(slots, torch.arange(count))),
        max_decode_context_len=int(lens.max()), prefills=(), logits_indices=torch.arange(count),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
@pytest.mark.parametrize("permuted", [False, True])
# (kv heads, heads, head_dim): the generic loop (16); the AVX512-BF16 path (SmolLM2's 3/9/64, Gemma 3's
# 1/4/256); a group too large for its registers (falls back to the generic loop)
@pytest.mark.parametrize("shape", [(3, 9, 16), (3, 9, 64), (1, 4, 256), (1, 8, 64)])
def test_native_decode_equals_sdpa(dtype, window, permuted, shape):
    torch.manual_seed(0)
    num_seqs, max_len = 6, 40
    kv_heads, heads, head_dim = shape
    keys = torch.randn(8, max_len, kv_heads, head_dim, dtype=dtype)
    values = torch.randn(8, max_len, kv_heads, head_dim, dtype=dtype)
    query = torch.randn(num_seqs, heads, head_dim, dtype=dtype)
    slots = torch.randperm(8)[:num_seqs] if permuted else torch.arange(num_seqs)
    lens = torch.tensor([1, 5, 17, 40, 23, 9])
    batch = _decode_batch(slots, lens)
    spec = LayerAttentionSpec(heads, kv_heads, head_dim, window)
    expected = torch.empty_like(query)
    create_attention_backend("torch")._decode(spec, query, keys, values, batch, expected)
    got = torch.empty_like(query)
    create_attention_backend("native")._decode(spec, query, keys, values, batch, got)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kv_store_equals_torch_and_checks_bounds(dtype):
    """The native backend's one-memcpy-per-row KV write puts exactly what index_copy_ puts, from a view
    into a fused qkv buffer, and refuses rows outside the cache like torch's indexing."""
    torch.manual_seed(0)
    slots, positions = torch.tensor([3, 0, 5, 3]), torch.tensor([0, 7, 2, 1])
    qkv = torch.randn(4, 5 * 3 * 16, dtype=dtype)
    keys = qkv[:, 3 * 16 : 6 * 16].view(4, 3, 16)  # a strided view, as the model passes it
    batch = ForwardBatch(input_ids=torch.zeros(4, dtype=torch.long), positions=positions, token_slots=slots,
                         num_decode_tokens=4, decode_slots=slots, decode_context_lens=positions + 1,
                         decode_slots_are_prefix=False, max_decode_context_len=8, prefills=(),
                         logits_indices=torch.arange(4))
    expected, got = torch.zeros(6, 8, 3, 16, dtype=dtype), torch.zeros(6, 8, 3, 16, dtype=dtype)
    create_attention_backend("torch")._store(expected, batch, keys)
    create_attention_backend("native")._store(got, batch, keys)
    assert torch.equal(got, expected)
    bad = ForwardBatch(**{**batch.__dict__, "positions": torch.tensor([0, 8, 2, 1])})
    with pytest.raises(IndexError, match="row 1"):
        create_attention_backend("native")._store(got, bad, keys)
