"""engine/model/linear.py: the native small-batch GEMM equals torch.mm (to fp32 rounding) wherever it is
used, and hands everything else to torch.mm."""

from __future__ import annotations

import pytest
import torch

from engine.model.linear import MAX_ROWS, NativeLinear, TorchLinear, create_linear


@pytest.fixture(scope="module")
def native():
    try:
        return NativeLinear()
    except (RuntimeError, OSError) as error:  # no compiler / no AVX2 here: `auto` falls back to torch
        pytest.skip(f"native GEMM unavailable: {error}")


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, MAX_ROWS])
@pytest.mark.parametrize("out_features, in_features", [(7, 576), (1728, 576), (576, 1536), (13, 21)])
def test_native_equals_torch_mm(native, rows, out_features, in_features, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # 16 rows go to the kernel with 2 threads
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    out = torch.full((rows, out_features), float("nan"))
    calls = []
    kernel = native._kernel
    monkeypatch.setattr(native, "_kernel", lambda *args: calls.append(args) or kernel(*args))
    assert native(x, weight, out) is out
    assert len(calls) == 1  # the C kernel did it, not the torch.mm fallback
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-5, atol=1e-4)


def test_native_writes_into_a_strided_output(native):
    x, weight = torch.randn(4, 64), torch.randn(10, 64)
    wide = torch.zeros(4, 16)
    native(x, weight, wide[:, 3:13])  # rows 16 floats apart, like a slice of a bigger buffer
    torch.testing.assert_close(wide[:, 3:13], x @ weight.t(), rtol=1e-5, atol=1e-4)
    assert wide[:, :3].abs().sum() == 0 and wide[:, 13:].abs().sum() == 0


def test_what_the_kernel_does_not_take_goes_to_torch(native):
    weight = torch.randn(8, 32)
    for x in (torch.randn(MAX_ROWS + 1, 32), torch.randn(32, 4).t(), torch.randn(2, 32, dtype=torch.bfloat16)):
        out = torch.empty(x.shape[0], 8, dtype=x.dtype)
        w = weight.to(x.dtype)
        torch.testing.assert_close(native(x, w, out), torch.mm(x, w.t()))


def test_registry():
    assert isinstance(create_linear("torch"), TorchLinear)
    assert isinstance(create_linear("auto"), TorchLinear)  # NativeLinear is one too
    with pytest.raises(ValueError, match="unknown linear backend"):
        create_linear("cublas")
