"""engine/model/elementwise.py: the bf16 C kernels compute what the torch ops compute (same bf16 roundings;
RMSNorm's fp32 sum may differ in order, so at most one bf16 step apart), and fp32 stays on the torch ops."""

from __future__ import annotations

import pytest
import torch

from engine.model.elementwise import NativeBf16Elementwise, TorchElementwise, create_elementwise

EPS = 1e-5


@pytest.fixture(scope="module")
def native():
    try:
        return NativeBf16Elementwise()
    except (RuntimeError, OSError) as error:
        pytest.skip(f"no C compiler: {error}")


def one_bf16_step(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=2 ** -7, atol=1e-6)


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
    hidden = torch.randn(rows, width, generator=generator).bfloat16()
    delta = torch.randn(rows, width, generator=generator).bfloat16()
    weight = torch.rand(width, generator=generator).bfloat16()
    expected_hidden = hidden.clone()
    expected = TorchElementwise().add_rms_norm(expected_hidden, delta, weight, torch.empty_like(hidden), EPS)
    out = torch.empty_like(hidden)
    assert native.add_rms_norm(hidden, delta, weight, out, EPS) is out
    assert torch.equal(hidden, expected_hidden)  # the residual add rounds exactly as torch's add_
    one_bf16_step(out, expected)
    one_bf16_step(native.rms_norm(hidden, weight, torch.empty_like(hidden), EPS), expected)
    assert len(calls) == 2


@pytest.mark.parametrize("tokens", [1, 5])  # one token: torch gives q and k different strides on dim 0
@pytest.mark.parametrize("dim", [64, 40])  # 40: half a head is 16 + a scalar tail of 4
def test_rope_in_place_on_the_fused_qkv_rows_matches_torch(native, tokens, dim, monkeypatch):
    calls = count_calls(native, "_rope", monkeypatch)
    generator = torch.Generator().manual_seed(1)
    heads, kv_heads = 9, 3
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=generator).bfloat16()
    table = torch.randn(tokens, 2, dim, generator=generator).bfloat16()
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
    gate_up = torch.randn(7, 2 * 1536, generator=torch.Generator().manual_seed(2)).bfloat16()
    expected = TorchElementwise().silu_mul(gate_up, torch.empty(7, 1536, dtype=torch.bfloat16))
    one_bf16_step(native.silu_mul(gate_up, torch.empty(7, 1536, dtype=torch.bfloat16)), expected)
    assert len(calls) == 1


def test_fp32_and_what_the_kernels_do_not_take_stay_on_torch(native):
    assert type(create_elementwise(torch.float32)) is TorchElementwise
    hidden = torch.randn(3, 64)
    out = native.add_rms_norm(hidden.clone(), None, torch.ones(64), torch.empty(3, 64), EPS)
    assert torch.equal(out, TorchElementwise().rms_norm(hidden, torch.ones(64), torch.empty(3, 64), EPS))
