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
def test_native_decode_equals_sdpa(dtype, window, permuted):
    torch.manual_seed(0)
    num_seqs, max_len, kv_heads, heads, head_dim = 6, 40, 3, 9, 16
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
