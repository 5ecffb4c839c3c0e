"""engine/model/linear.py: the native fp32 GEMM over panel-packed weights equals torch.mm (to fp32 rounding)
at every row count, gives each row the same bits whatever the batch, and hands everything else to torch.mm."""

from __future__ import annotations

import pytest
import torch

from engine.model.linear import NativeLinear, PanelWeight, TorchLinear
from engine.model.linear_registry import create_linear


@pytest.fixture(scope="module")
def native():
    try:
        return NativeLinear()
    except (RuntimeError, OSError) as error:  # no compiler / no AVX2 here: `auto` falls back to torch
        pytest.skip(f"native GEMM unavailable: {error}")


def _placed(native: NativeLinear, weight: torch.Tensor) -> PanelWeight:
    allocated = []
    placed = native.place(weight, lambda tensor: allocated.append(tensor.clone()) or allocated[-1])
    assert isinstance(placed, PanelWeight) and placed.panels is allocated[0]  # the packed bytes are the pool's
    assert placed.shape == weight.shape
    return placed


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 8, 64, 65, 300])
@pytest.mark.parametrize("out_features, in_features", [(7, 576), (1728, 576), (576, 1536), (13, 21), (40, 9)])
def test_native_equals_torch_mm(native, rows, out_features, in_features, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    generator = torch.Generator().manual_seed(rows * 1000 + out_features)
    x = torch.randn(rows, in_features, generator=generator)
    weight = torch.randn(out_features, in_features, generator=generator)
    placed = _placed(native, weight)
    out = torch.full((rows, out_features), float("nan"))
    calls = []
    kernel = native._kernel
    monkeypatch.setattr(native, "_kernel", lambda *args: calls.append(args) or kernel(*args))
    assert native(x, placed, out) is out
    assert len(calls) == 1  # the C kernel did it, not the torch.mm fallback
    # one FMA chain per output: rounding grows with the inputs (sums of ~40 here at 1536 inputs)
    torch.testing.assert_close(out, x @ weight.t(), rtol=1e-5, atol=1e-4 * max(1.0, in_features / 256))


def test_a_rows_bits_do_not_depend_on_the_batch_or_threads(native, monkeypatch):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(70, 576, generator=generator)
    placed = _placed(native, torch.randn(100, 576, generator=generator))
    alone = [native(x[i : i + 1], placed, torch.empty(1, 100)) for i in (0, 5, 69)]
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda count=threads: count)
        batch = native(x, placed, torch.empty(70, 100))
        for row, i in zip(alone, (0, 5, 69), strict=True):
            assert torch.equal(batch[i : i + 1], row)


def test_pack_round_trips(native):
    weight = torch.randn(37, 11)
    placed = _placed(native, weight)
    assert placed.panels.shape == (3, 11, 16) and placed.panels[2, :, 5:].abs().sum() == 0
    assert torch.equal(placed.unpack(), weight)


def test_a_tied_embedding_is_one_copy_in_panels_for_the_lookup_and_the_head(native):
    embed = torch.randn(50, 24)
    allocated = []
    lookup, head = native.place_tied(embed, lambda tensor: allocated.append(tensor) or tensor)
    assert lookup is head and len(allocated) == 1 and isinstance(head, PanelWeight)
    ids = torch.tensor([0, 49, 17, 17, 33])
    out = torch.empty(5, 24)
    assert native.rows(lookup, ids, out) is out and torch.equal(out, embed[ids])
    plain_lookup, plain_head = TorchLinear().place_tied(embed, lambda tensor: tensor.clone())
    assert plain_lookup is plain_head and torch.equal(TorchLinear().rows(plain_lookup, ids, out), embed[ids])


def test_native_writes_into_a_strided_output_with_a_bias(native):
    x, weight, bias = torch.randn(4, 64), torch.randn(10, 64), torch.randn(10)
    wide = torch.zeros(4, 16)
    native(x, _placed(native, weight), wide[:, 3:13], bias)  # rows 16 floats apart, like a slice of a buffer
    torch.testing.assert_close(wide[:, 3:13], x @ weight.t() + bias, rtol=1e-5, atol=1e-4)
    assert wide[:, :3].abs().sum() == 0 and wide[:, 13:].abs().sum() == 0


def test_what_the_kernel_does_not_take_goes_to_torch(native):
    weight = torch.randn(8, 32)
    placed = _placed(native, weight)
    x = torch.randn(32, 4).t()  # rows not contiguous
    torch.testing.assert_close(native(x, placed, torch.empty(4, 8)), torch.mm(x, weight.t()))
    bf16 = weight.bfloat16()
    assert native.place(bf16, lambda tensor: tensor) is bf16  # other dtypes stay plain, for torch.mm
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(native(x, bf16, torch.empty(2, 8, dtype=torch.bfloat16)), torch.mm(x, bf16.t()))


def test_registry():
    assert isinstance(create_linear("torch"), TorchLinear)
    assert isinstance(create_linear("auto"), TorchLinear)  # NativeLinear and OneDnnLinear are ones too
    assert type(create_linear("auto", "cuda")) is TorchLinear  # GPU weights: cuBLAS, never a CPU kernel
    with pytest.raises(ValueError, match="unknown linear backend"):
        create_linear("cublas")


# ---- onednn: bf16 weights pre-packed, their bytes in the caller's (the pool's) memory -------------------------
@pytest.fixture(scope="module")
def onednn():
    from engine.model.onednn_linear import OneDnnLinear, onednn_available

    if not onednn_available():
        pytest.skip("no AVX512-BF16 / AMX here: `auto` does not pick onednn")
    return OneDnnLinear(TorchLinear())


@pytest.mark.parametrize("rows", [1, 16, 300])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (7, 64)])
def test_onednn_packed_weight_lives_in_the_allocators_memory_and_matches_mm(onednn, rows, out_features, in_features):
    from engine.model.onednn_linear import PackedWeight

    generator = torch.Generator().manual_seed(rows + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    arena = torch.zeros(out_features * in_features * 2 + 16384, dtype=torch.uint8)
    placed = []

    def allocate(tensor):  # a bump allocator over `arena`, like engine/device/weight_arena.py
        view = arena[4096 - 64 : 4096 - 64 + tensor.numel()].view(tensor.dtype)
        view.copy_(tensor)
        placed.append(tensor.numel())
        return view

    packed = onednn.place(weight, allocate)
    assert isinstance(packed, PackedWeight) and packed.shape == (out_features, in_features)
    assert len(placed) == 1  # one blob: the packed bytes (padded to oneDNN's blocks for odd shapes)
    if out_features % 64 == 0:
        assert placed == [out_features * in_features * 2]  # as big as plain bf16
    assert packed.storage.data_ptr() == arena.data_ptr() + 4096 - 64
    out = torch.full((rows, out_features), float("nan"), dtype=torch.bfloat16)
    assert onednn(x, packed, out) is out
    expected = torch.mm(x.float(), weight.float().t())
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    arena[4096 - 64 :].zero_()  # the product reads the arena's bytes, not a copy of its own
    torch.testing.assert_close(onednn(x, packed, out).float(), torch.zeros(rows, out_features))


def test_onednn_leaves_fp32_to_its_fallback_and_writes_fp32_logits(onednn):
    weight, x = torch.randn(10, 32), torch.randn(3, 32)
    placed = onednn.place(weight, lambda tensor: tensor)
    assert placed is weight  # fp32: stored plain, products by the fallback (bit-equal to torch.mm)
    assert torch.equal(onednn(x, placed, torch.empty(3, 10)), torch.mm(x, weight.t()))
    packed = onednn.place(weight.bfloat16(), lambda tensor: tensor.clone())
    logits = torch.empty(3, 10)  # fp32 logits from a bf16 product (what the sampler's argmax reads)
    onednn(x.bfloat16(), packed, logits)
    if onednn._skinny is not None and onednn._skinny.takes(x.bfloat16(), packed, logits):  # sums kept in fp32
        torch.testing.assert_close(logits, torch.mm(x.bfloat16().float(), weight.bfloat16().float().t()))
    else:  # oneDNN's product is rounded to bf16, then widened
        torch.testing.assert_close(logits, torch.mm(x.bfloat16(), weight.bfloat16().t()).float())
    bias = torch.randn(10).bfloat16()
    torch.testing.assert_close(onednn(x.bfloat16(), packed, torch.empty(3, 10, dtype=torch.bfloat16), bias),
                               torch.addmm(bias, x.bfloat16(), weight.bfloat16().t()))


# ---- the packed small-batch kernel: the same packed bytes, read by csrc/packed_gemm_bf16.c ------------------
@pytest.mark.parametrize("rows", [1, 2, 21])
@pytest.mark.parametrize("out_features, in_features", [(960, 576), (70, 45), (49152 // 64, 576)])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_packed_small_batch_kernel_matches_fp32_products(onednn, rows, out_features, in_features, out_dtype):
    """Odd shapes too (a partial 32-row block, an odd input length); fp32 logits and bf16 outputs; rows of x
    and y apart by more than a row (views into wider buffers, as the model passes them)."""
    if onednn._skinny is None:
        pytest.skip("no AVX512-BF16 here: oneDNN serves every size")
    generator = torch.Generator().manual_seed(rows * out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    packed = onednn.place(weight, lambda tensor: tensor.clone())
    assert packed.k_padded in (-(-in_features // 32) * 32, -(-in_features // 64) * 64)  # the layout was recognised
    assert packed.block in (32, 64)
    x = torch.randn(rows, in_features + 5, generator=generator).bfloat16()[:, :in_features]
    out = torch.full((rows, out_features + 3), float("nan"), dtype=out_dtype)[:, :out_features]
    assert onednn._skinny.takes(x, packed, out)
    onednn(x, packed, out)
    expected = torch.mm(x.float(), weight.float().t())
    tolerance = 2e-2 if out_dtype == torch.bfloat16 else 1e-4  # fp32: only the order of the fp32 sums differs
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("rows", [1, 5, 21])
@pytest.mark.parametrize("out_features, in_features", [(70, 45), (200, 192)])
def test_packed_kernel_sums_in_vdpbf16ps_order(onednn, rows, out_features, in_features):
    """Bit for bit what vdpbf16ps gives (each output's fp32 sum over input pairs, odd input first, each
    exact bf16 product added with one rounding), so every path using the kernel, the fused decode step's
    and the per-op one, at any row count and thread split, gives the same bits. (With AMX, products run on
    tiles instead: test_the_packed_kernels_amx_tiles_sum_right_and_split_invariantly.)"""
    from engine.model.onednn_linear import packed_routine

    if onednn._skinny is None:
        pytest.skip("no AVX512-BF16 here: oneDNN serves every size")
    generator = torch.Generator().manual_seed(rows + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    packed = onednn.place(weight, lambda tensor: tensor.clone())
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    out = torch.empty(rows, out_features, dtype=torch.float32)
    with packed_routine(tiles_from=0):  # the vector routines (AMX's tiles sum in their own order)
        onednn._skinny(x, packed, out)
    w, xs = weight.float(), x.float()
    expected = torch.zeros(rows, out_features)
    for p in range(0, in_features, 2):  # a product of two bf16 values is exact in fp32: one rounding per add
        if p + 1 < in_features:
            expected = expected + xs[:, p + 1 : p + 2] * w[:, p + 1]
        expected = expected + xs[:, p : p + 1] * w[:, p]
    assert torch.equal(out, expected)


def test_packed_kernel_rows_do_not_depend_on_the_batch(onednn):
    """A row's outputs are the same bits whether it is multiplied alone or among 40 rows (a prompt chunk, a
    decode batch): the kernel sums each output in one fixed order at every size and thread split."""
    if onednn._skinny is None:
        pytest.skip("no AVX512-BF16 here: oneDNN serves every size")
    generator = torch.Generator().manual_seed(3)
    packed = onednn.place(torch.randn(200, 192, generator=generator).bfloat16(), lambda tensor: tensor.clone())
    x = torch.randn(40, 192, generator=generator).bfloat16()
    together = onednn._skinny(x, packed, torch.empty(40, 200, dtype=torch.bfloat16))
    for row in (0, 17, 39):
        alone = onednn._skinny(x[row : row + 1], packed, torch.empty(1, 200, dtype=torch.bfloat16))
        assert torch.equal(alone[0], together[row])


def test_packed_layout_is_verified_not_assumed():
    from engine.model.onednn_linear import blocked_pairs_layout

    weight = torch.randn(64, 64).bfloat16()
    plain = weight.contiguous().view(torch.uint8).flatten()  # right size, wrong layout
    assert blocked_pairs_layout(weight, plain) is None
    assert blocked_pairs_layout(weight, plain[:-2]) is None
    blocked = weight.view(2, 32, 32, 2).permute(0, 2, 1, 3).contiguous().view(torch.uint8).flatten()
    assert blocked_pairs_layout(weight, blocked) == (32, 64)
    blocked = weight.view(1, 64, 32, 2).permute(0, 2, 1, 3).contiguous().view(torch.uint8).flatten()
    assert blocked_pairs_layout(weight, blocked) == (64, 64)


@pytest.mark.parametrize("source", ["packed_gemm_bf16.c", "decode_step_bf16.c"])
def test_bf16_kernels_decline_a_build_without_avx512_bf16(source):
    """On an AVX2-only CPU the bf16 kernels refuse to build (RuntimeError), which their Python sides catch to
    keep oneDNN's products and the per-op path."""
    import shutil
    from pathlib import Path

    from engine import native_build

    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    avx2_flags = tuple("-march=haswell" if flag == "-march=native" else flag for flag in native_build.FLAGS)
    path = Path(native_build.__file__).parent / "model" / "csrc" / source
    with pytest.raises(RuntimeError, match="needs AVX512-BF16"):
        native_build.load_library(path, avx2_flags)


@pytest.mark.parametrize("rows", [1, 4, 5, 21, 64])
@pytest.mark.parametrize("out_features, in_features", [(70, 45), (200, 192), (960, 576)])
def test_the_packed_kernels_two_routines_give_the_same_bits(onednn, rows, out_features, in_features):
    """fp32 FMAs and vdpbf16ps (csrc/packed_gemm_bf16.h; `bf16_dot` picks the faster per CPU) give the same
    bits, denormal inputs included (read as 0 by both), for bf16 and fp32 outputs; each sums in vdpbf16ps'
    order (the test above, per routine, on normal values)."""
    from engine.model.onednn_linear import BF16_DOTS, packed_routine

    if onednn._skinny is None:
        pytest.skip("no AVX512-BF16 here: oneDNN serves every size")
    generator = torch.Generator().manual_seed(rows * 7 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    weight[torch.rand(weight.shape, generator=generator) < 0.05] *= 1e-39  # bf16 denormals
    packed = onednn.place(weight.bfloat16(), lambda tensor: tensor.clone())
    x = torch.randn(rows, in_features + 3, generator=generator)
    x[torch.rand(x.shape, generator=generator) < 0.05] *= 1e-39
    x = x.bfloat16()[:, :in_features]
    normal_x = torch.randn(rows, in_features, generator=generator).bfloat16()
    normal_w = torch.randn(out_features, in_features, generator=generator).bfloat16()
    normal_packed = onednn.place(normal_w, lambda tensor: tensor.clone())
    expected = torch.zeros(rows, out_features)
    for p in range(0, in_features, 2):
        if p + 1 < in_features:
            expected = expected + normal_x[:, p + 1 : p + 2].float() * normal_w[:, p + 1].float()
        expected = expected + normal_x[:, p : p + 1].float() * normal_w[:, p].float()
    results = {}
    for dot in BF16_DOTS:
        with packed_routine(dot, tiles_from=0):  # the two vector routines, not AMX's tiles
            for dtype in (torch.bfloat16, torch.float32):
                results[dot, dtype] = onednn._skinny(x, packed, torch.empty(rows, out_features, dtype=dtype))
            assert torch.equal(onednn._skinny(normal_x, normal_packed, torch.empty(rows, out_features)), expected)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(results["fma", dtype], results["vdpbf16ps", dtype])


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40, 64])
@pytest.mark.parametrize("out_features, in_features", [(70, 64), (200, 192), (960, 576), (576, 1536)])
def test_the_packed_kernels_amx_tiles_sum_right_and_split_invariantly(onednn, rows, out_features, in_features):
    """Where the CPU has AMX, products on tiles (csrc/packed_gemm_bf16.h, packed_gemm_units_amx) equal the fp32
    sums to within fp32 rounding, for every row count (partial 16-row tiles, paired units, a partial last
    block of outputs), bf16 and fp32 outputs; and their bits do not depend on how the threads split the units
    (the fused decode step splits them its own way: test_decode_step's bit-equality rests on this)."""
    from engine.model.onednn_linear import packed_routine

    if onednn._skinny is None or not torch.cpu._is_amx_tile_supported():
        pytest.skip("no AMX here")
    generator = torch.Generator().manual_seed(rows * 13 + out_features)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    packed = onednn.place(weight, lambda tensor: tensor.clone())
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    expected = x.double() @ weight.double().t()
    threads = torch.get_num_threads()
    try:
        with packed_routine(tiles_from=1):
            got = {}
            for count in (1, 2, 3):
                torch.set_num_threads(count)
                got[count] = onednn._skinny(x, packed, torch.empty(rows, out_features))
            bf16 = onednn._skinny(x, packed, torch.empty(rows, out_features, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[1], got[2]) and torch.equal(got[1], got[3])
    scale = x.double().abs() @ weight.double().abs().t()
    assert ((got[1].double() - expected).abs() <= 1e-5 * scale + 1e-30).all()
    assert torch.equal(bf16, got[1].bfloat16())


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 129])
@pytest.mark.parametrize("inter, in_features", [(64, 64), (1536, 576), (96, 100)])
def test_the_fused_gate_up_silu_gives_the_separate_calls_bits(onednn, rows, inter, in_features, monkeypatch):
    """packed_gemm_silu_mul_bf16 (the MLP's product and SiLU x up in one region) writes the same gate_up and act
    as the packed product then NativeBf16Elementwise.silu_mul, on the vector routine and, where the CPU has
    them, on AMX tiles; it declines gate/up halves that do not split at an output block (nothing written).
    The packed kernel takes every row count here (with AMX the engine gives it up to SKINNY_MAX_ROWS)."""
    from engine.model import onednn_linear
    from engine.model.elementwise import NativeBf16Elementwise
    from engine.model.onednn_linear import packed_routine

    monkeypatch.setattr(onednn_linear, "SKINNY_MAX_ROWS", 1 << 30)

    if onednn._skinny is None:
        pytest.skip("no AVX512-BF16 here: oneDNN serves every size")
    ops = NativeBf16Elementwise()
    generator = torch.Generator().manual_seed(rows * 13 + inter)
    packed = onednn.place((torch.randn(2 * inter, in_features, generator=generator) * 0.2).bfloat16(),
                          lambda tensor: tensor.clone())
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    for tiles_from in (0, 1):
        with packed_routine(tiles_from=tiles_from):
            gate_up = onednn(x, packed, torch.empty(rows, 2 * inter, dtype=torch.bfloat16))
            act = ops.silu_mul(gate_up, torch.empty(rows, inter, dtype=torch.bfloat16))
            fused_gate_up = torch.full_like(gate_up, 7.0)
            fused_act = torch.full_like(act, 7.0)
            taken = onednn.gate_up_silu(x, packed, fused_gate_up, fused_act)
        if inter % packed.block:
            assert not taken and bool((fused_act == 7.0).all())
            continue
        assert taken
        assert torch.equal(fused_gate_up, gate_up) and torch.equal(fused_act, act)


def test_onednn_row_counts_are_bucketed():
    """oneDNN caches a primitive (~0.5 MB) per row count: it only ever sees multiples of 64 rows up to 1,024 and
    of 256 beyond, so a server's memory does not grow with every prefill size it meets."""
    from engine.model.onednn_linear import onednn_rows

    assert [onednn_rows(rows) for rows in (1, 33, 64, 65, 257, 320, 1024, 1025, 2048, 2049)] == \
        [64, 64, 64, 128, 320, 320, 1024, 1280, 2048, 2304]
    assert len({onednn_rows(rows) for rows in range(1, 8193)}) == 16 + 28


@pytest.mark.parametrize("rows", [33, 257, 300, 1100])
def test_padded_onednn_products_give_the_unpadded_rows(onednn, rows):
    """The zero rows a bucket adds change nothing in the rows asked for (bit for bit with AMX, where oneDNN
    serves these sizes in the engine)."""
    from engine.model.onednn_linear import onednn_product

    generator = torch.Generator().manual_seed(rows)
    packed = onednn.place((torch.randn(960, 576, generator=generator) * 0.05).bfloat16(), lambda tensor: tensor.clone())
    x = torch.randn(rows, 576, generator=generator).bfloat16()
    got = onednn_product(x, packed)
    unpadded = torch.ops.mkldnn._linear_pointwise(x, packed.tensor, None, "none", [], "")
    assert got.shape == unpadded.shape
    if torch.cpu._is_amx_tile_supported():
        assert torch.equal(got, unpadded)
    else:
        torch.testing.assert_close(got.float(), unpadded.float(), rtol=2e-2, atol=2e-2)
