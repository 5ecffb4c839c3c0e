"""engine/model/elementwise.py: the C kernels compute what the torch ops compute. bf16: the same bf16 roundings
(RMSNorm's fp32 sum may differ in order, so at most one bf16 step apart); fp32: the residual add and RoPE bit for
bit, RMSNorm and SiLU within a few ulps."""

from __future__ import annotations

import pytest
import torch

from engine.model.elementwise import (
    NativeBf16Elementwise,
    NativeF32Elementwise,
    TorchElementwise,
    create_elementwise,
)

EPS = 1e-5


@pytest.fixture(scope="module", params=[NativeBf16Elementwise, NativeF32Elementwise], ids=["bf16", "f32"])
def native(request):
    try:
        return request.param()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"no C compiler or no AVX2: {error}")


def close_to_torch(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """One bf16 step apart (bf16), or a few fp32 ulps (fp32)."""
    tolerance = 2 ** -7 if actual.dtype == torch.bfloat16 else 4e-6
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tolerance, atol=1e-6)


def count_calls(native, name: str, monkeypatch) -> list:
    calls = []
    kernel = getattr(native, name)
    monkeypatch.setattr(native, name, lambda *args: calls.append(args) or kernel(*args))
    return calls


@pytest.mark.parametrize("rows", [1, 9])
@pytest.mark.parametrize("width", [576, 100])  # 100: the vector loop's masked tail
def test_add_rms_norm_matches_torch(native, rows, width, monkeypatch):
    calls = count_calls(native, "_norm", monkeypatch)
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, width, generator=generator).to(native.DTYPE)
    delta = torch.randn(rows, width, generator=generator).to(native.DTYPE)
    weight = torch.rand(width, generator=generator).to(native.DTYPE)
    expected_hidden = hidden.clone()
    expected = TorchElementwise().add_rms_norm(expected_hidden, delta, weight, torch.empty_like(hidden), EPS)
    out = torch.empty_like(hidden)
    assert native.add_rms_norm(hidden, delta, weight, out, EPS) is out
    assert torch.equal(hidden, expected_hidden)  # the residual add rounds exactly as torch's add_
    close_to_torch(out, expected)
    close_to_torch(native.rms_norm(hidden, weight, torch.empty_like(hidden), EPS), expected)
    assert len(calls) == 2


@pytest.mark.parametrize("tokens", [1, 5])  # one token: torch gives q and k different strides on dim 0
@pytest.mark.parametrize("dim", [64, 40])  # 40: half a head is 16 + a scalar tail of 4
def test_rope_in_place_on_the_fused_qkv_rows_matches_torch(native, tokens, dim, monkeypatch):
    calls = count_calls(native, "_rope", monkeypatch)
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads = 9, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).to(native.DTYPE)
    table = torch.randn(tokens, 2, dim, generator=generator).to(native.DTYPE)
    cos, sin = table[:, 0:1], table[:, 1:2]
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    expected_q, expected_k = TorchElementwise().rope(q, k, cos, sin)
    rotated_q, rotated_k = native.rope(q, k, cos, sin)
    assert rotated_q.data_ptr() == q.data_ptr()  # in place
    assert torch.equal(rotated_q, expected_q) and torch.equal(rotated_k, expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)
    assert len(calls) == 2  # the C kernel did q and k, not the torch fallback


def test_silu_mul_matches_torch(native, monkeypatch):
    calls = count_calls(native, "_silu_mul", monkeypatch)
    gate_up = 4 * torch.randn(7, 2 * 1537, generator=torch.Generator().manual_seed(2)).to(native.DTYPE)
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])  # exp's clamp, no overflow, zeros
    expected = TorchElementwise().silu_mul(gate_up, torch.empty(7, 1537, dtype=native.DTYPE))
    close_to_torch(native.silu_mul(gate_up, torch.empty(7, 1537, dtype=native.DTYPE)), expected)
    assert len(calls) == 1


def test_each_dtype_gets_its_kernels_and_what_they_do_not_take_stays_on_torch(native):
    assert type(create_elementwise(native.DTYPE)) is type(native)
    assert type(create_elementwise(torch.float16)) is TorchElementwise
    other = torch.float32 if native.DTYPE == torch.bfloat16 else torch.bfloat16
    hidden = torch.randn(3, 64).to(other)
    weight = torch.ones(64, dtype=other)
    out = native.add_rms_norm(hidden.clone(), None, weight, torch.empty(3, 64, dtype=other), EPS)
    assert torch.equal(out, TorchElementwise().rms_norm(hidden, weight, torch.empty(3, 64, dtype=other), EPS))
