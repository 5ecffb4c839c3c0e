"""The `onednn` linear backend: bf16 weights pre-packed for oneDNN (AMX / AVX512-BF16), kept in the pool.

torch.mm on a plain [out, in] bf16 weight makes oneDNN reorder the weight into its blocked layout at every
call; packing once at load (`torch.ops.mkldnn._reorder_linear_weight`) and calling
`torch.ops.mkldnn._linear_pointwise` per product removes that (1.3-3x per linear on an AVX512-BF16/AMX box,
see `python -m engine.model.onednn_linear`).

Weights stay in the pool's `weights` balloon: torch returns the packed weight as an opaque `_mkldnn` tensor
that owns a malloc'd buffer. Its bytes (`torch.ops.mkldnn._nbytes`, `data_ptr`) are copied through the
caller's allocator into the arena, and an `_mkldnn` tensor is made over that arena memory with the memory
descriptor torch serialises for AOTInductor (`_get_mkldnn_serialized_md` and the C shim
`aoti_torch_create_tensor_from_blob_v2`, which wraps, never copies or frees, the blob). The malloc'd original
is then dropped. The wrapper does not own the arena bytes, so `PackedWeight` holds both.

Products of up to `SKINNY_MAX_ROWS` rows (decode, short prefills; every product on CPUs without AMX) skip oneDNN:
csrc/packed_gemm_bf16.c reads the same packed bytes at close to the memory bandwidth (oneDNN's kernels read
them at about half of it at decode sizes) and computes faster than oneDNN's AVX512-BF16 kernels. It relies
on the blocked layout oneDNN chose (32 or 64 outputs x pairs of inputs, by CPU; see the C file), which `pack`
verifies on every weight (its size and a sample of its values); a weight whose layout differs keeps oneDNN
for every size. Its logits are fp32 sums (oneDNN's are rounded to bf16 and widened).

The kernel computes with one of two routines that give the same bits, fp32 FMAs or vdpbf16ps, whichever is
faster on this CPU (`bf16_dot`: timed once per process; FMAs on the AVX512-BF16 Xeon, vdpbf16ps on Zen 4).

Only bf16 CPU weights are packed; everything else goes to the wrapped fallback backend (native / torch),
so fp32 outputs are unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.model.elementwise import NativeBf16Elementwise
from engine.model.linear import Allocator, TorchLinear
from engine.native_build import amx_rows_setting, load_library

# oneDNN picks a blocked layout by the batch-size hint; the layout for hint 1 is a GEMV layout that is slow
# from a few rows on, while the one for 16+ serves every batch size (decode and prefill) well.
PACK_BATCH_HINT = 16
# at most this many rows go to the packed kernel. With AMX, oneDNN (whose result torch returns in a fresh buffer,
# copied into the caller's) is faster from ~40 rows at a product's own row count (2026-12-07 late, Xeon with AMX,
# 2 threads, the engine's placed weights; packed / onednn+copy at 128 rows: 960x576 113 / 90 us, 576x576 73 /
# 60, 3072x576 315 / 255, 576x1536 143 / 108; a 129-token prefill 53.6 ms with 256 rows here, 46.0 with 32), but
# oneDNN only sees bucketed row counts (ONEDNN_ROW_BUCKET: each distinct count costs a cached primitive), and at
# 129 rows padded to 192 it lost that gain (prefill 76.9 vs 67.6 ms, alternated, a slower spell). So the packed
# kernel keeps every product up to 256 rows, where it is within ~25% of oneDNN and needs no primitives. Products
# with more than WIDE_OUTPUTS outputs (the 49152x576 lm head)
# go to oneDNN from WIDE_MAX_ROWS + 1 rows (at 64 rows 5.8 vs 6.7 ms; at 128 7.7 vs 11.0). Without AMX
# (AVX512-BF16 only) the kernel's fp32 FMAs beat oneDNN at every size on the layer shapes, prefill included
# (2026-12-05, 2 threads: 3072x576 at 64 rows 2.0 vs 4.4 ms, at 512 rows 21 vs 39 ms; 576x576 at 16 rows 98
# vs 167 us), so there it takes every product. Per-shape times: `python -m engine.model.onednn_linear`.
SKINNY_MAX_ROWS = 256 if torch.cpu._is_amx_tile_supported() else 1 << 30
WIDE_OUTPUTS = 8192
WIDE_MAX_ROWS = 32 if torch.cpu._is_amx_tile_supported() else 1 << 30
# products of at least this many rows run on AMX tiles where the CPU has them (ELASTIC_SERVE_AMX_ROWS
# overrides, 0 turns the tiles off): from one row, as the tiles beat the vector routines at every size (at
# 1 row 960x576 60 vs 96 us; the lm head, streaming its weight, 0.83-0.87x the time with the tile loop's
# prefetch)
AMX_ROWS = 1
PACKED_GEMM_SOURCE = Path(__file__).parent / "csrc" / "packed_gemm_bf16.c"
# oneDNN builds (and caches, up to 1,024) a primitive per row count, each holding ~0.5 MB with its buffers: an
# engine prefilling one prompt of each length 257..699, twice, grew 632 -> 1,490 -> 1,946 MB (2026-12-07, Xeon with
# AMX, bf16), and 635 -> 714 -> 715 MB with the buckets. So oneDNN sees row counts rounded up to a multiple of
# ONEDNN_ROW_BUCKET (of ONEDNN_WIDE_ROW_BUCKET beyond ONEDNN_ROW_BUCKET_UNTIL rows), the extra rows zeros whose
# results are dropped: at most 16 + 28 row counts per weight up to 8,192 rows.
ONEDNN_ROW_BUCKET = 64
ONEDNN_ROW_BUCKET_UNTIL = 1024
ONEDNN_WIDE_ROW_BUCKET = 256
# the packed kernel's two routines (csrc/packed_gemm_bf16.h), same bits: ELASTIC_SERVE_BF16_DOT picks one, else
# the faster one on a timed product
BF16_DOTS = ("fma", "vdpbf16ps")
_chosen_dot: int | None = None
logger = logging.getLogger(__name__)


def bf16_dot() -> str:
    """The routine the packed kernel and the fused decode step compute products with in this process:
    `ELASTIC_SERVE_BF16_DOT` (fma | vdpbf16ps) if set, else the faster of the two on a 64-row product, one
    thread, best of 7 each, alternating (vdpbf16ps only when at least 10% faster: the FMAs are the measured
    choice on Intel's AVX512-BF16 CPUs). Decided once; every product gives the same bits either way."""
    global _chosen_dot
    if _chosen_dot is None:
        forced = os.environ.get("ELASTIC_SERVE_BF16_DOT", "").strip().lower()
        if forced in BF16_DOTS:
            _chosen_dot = BF16_DOTS.index(forced)
        else:
            timer = load_library(PACKED_GEMM_SOURCE).packed_gemm_time_dots
            timer.restype, timer.argtypes = ctypes.c_int64, [ctypes.c_int64, ctypes.c_void_p]
            times = (ctypes.c_int64 * 2)()
            _chosen_dot = int(timer(7, times) == 0 and times[1] < 0.9 * times[0])
            logger.info("packed bf16 products: %s (64x512x576, one thread: FMAs %.0f us, vdpbf16ps %.0f us)",
                        BF16_DOTS[_chosen_dot], times[0] / 1e3, times[1] / 1e3)
    return BF16_DOTS[_chosen_dot]


def amx_rows() -> int:
    """The fewest rows a packed product runs on AMX tiles with in this process; 0: never (no AMX, or
    ELASTIC_SERVE_AMX_ROWS=0)."""
    if not torch.cpu._is_amx_tile_supported():
        return 0
    return amx_rows_setting(AMX_ROWS)


def set_bf16_dot(library: ctypes.CDLL, dot: str | None = None, tiles_from: int | None = None) -> None:
    """Makes `library` (one built with csrc/packed_gemm_bf16.h) compute with `dot` (default: `bf16_dot()`),
    and products of at least `tiles_from` rows (default: `amx_rows()`; 0: none) on AMX tiles."""
    library.packed_gemm_set_dot.restype, library.packed_gemm_set_dot.argtypes = ctypes.c_int64, [ctypes.c_int64]
    library.packed_gemm_set_dot(BF16_DOTS.index(dot or bf16_dot()))
    library.packed_gemm_set_amx.restype, library.packed_gemm_set_amx.argtypes = ctypes.c_int64, [ctypes.c_int64]
    wanted = amx_rows() if tiles_from is None else tiles_from
    if library.packed_gemm_set_amx(wanted) == 0 and wanted:
        logger.warning("AMX tiles refused (kernel permission or build): packed products keep the vector routine")


@dataclass(frozen=True)
class PackedWeight:
    """An `_mkldnn` tensor over `storage` (uint8 arena bytes that must outlive it), logical shape [out, in]."""

    tensor: torch.Tensor
    storage: torch.Tensor
    k_padded: int | None = None  # set when the bytes are in the layout packed_gemm_bf16.c reads
    block: int = 32  # outputs per block of that layout

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape


class _BlobShim:
    """ctypes view of the two AOTInductor shim calls used to wrap arena memory as an `_mkldnn` tensor."""

    def __init__(self):
        library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        codes = {}
        for name in ("aoti_torch_dtype_bfloat16", "aoti_torch_device_type_cpu", "aoti_torch_layout__mkldnn"):
            function = getattr(library, name)
            function.restype = ctypes.c_int32
            codes[name] = function()
        self.bf16, self.cpu, self.mkldnn = codes.values()
        int64p = ctypes.POINTER(ctypes.c_int64)
        self.create = library.aoti_torch_create_tensor_from_blob_v2
        self.create.restype = ctypes.c_int32
        self.create.argtypes = [ctypes.c_void_p, ctypes.c_int64, int64p, int64p, ctypes.c_int64, ctypes.c_int32,
                                ctypes.c_int32, ctypes.c_int32, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int32,
                                ctypes.c_void_p, ctypes.c_int64]
        self.capsule = ctypes.pythonapi.PyCapsule_New
        self.capsule.restype = ctypes.py_object
        self.capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

    def wrap(self, storage: torch.Tensor, shape: torch.Size, metadata: torch.Tensor) -> torch.Tensor:
        sizes = (ctypes.c_int64 * 2)(*shape)
        strides = (ctypes.c_int64 * 2)(shape[1], 1)
        handle = ctypes.c_void_p()
        error = self.create(storage.data_ptr(), 2, sizes, strides, 0, self.bf16, self.cpu, 0, ctypes.byref(handle),
                            self.mkldnn, metadata.data_ptr(), metadata.numel())
        if error:
            raise RuntimeError(f"aoti_torch_create_tensor_from_blob_v2 failed ({error})")
        # the handle is a heap-allocated at::Tensor; torch takes it over (and deletes the handle)
        return torch._C._aoti.alloc_tensor_by_stealing_from_void_ptr(self.capsule(handle.value, None, None))


def blocked_pairs_layout(weight: torch.Tensor, raw: torch.Tensor, samples: int = 2048) -> tuple[int, int] | None:
    """(outputs per block, padded input length) if `raw` (packed bytes) holds `weight` [out, in] in the
    B-output x input-pair blocks packed_gemm_bf16.c reads (B = 32 or 64, inputs padded to a multiple of 32 or
    64), else None: the byte count must match and a fixed sample of values (corners included) must sit where
    that layout puts them."""
    out_features, in_features = weight.shape
    generator = torch.Generator().manual_seed(0)
    rows = torch.randint(out_features, (samples,), generator=generator)
    cols = torch.randint(in_features, (samples,), generator=generator)
    rows = torch.cat([torch.tensor([0, out_features - 1]), rows])  # the corners too
    cols = torch.cat([torch.tensor([0, in_features - 1]), cols])
    expected = weight.view(torch.int16)[rows, cols]
    for block in (32, 64):
        for k_multiple in (32, 64):
            k_padded = -(-in_features // k_multiple) * k_multiple
            if raw.numel() != -(-out_features // block) * block * k_padded * 2:
                continue
            positions = (rows // block) * block * k_padded + (cols // 2) * 2 * block + (rows % block) * 2 + cols % 2
            if torch.equal(raw.view(torch.int16)[positions], expected):
                return block, k_padded
    return None


def pack(weight: torch.Tensor, allocate: Allocator, shim: _BlobShim) -> PackedWeight:
    """`weight` [out, in] bf16 packed for oneDNN, its bytes placed by `allocate`."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    num_bytes = torch.ops.mkldnn._nbytes(packed)
    raw = torch.empty(num_bytes, dtype=torch.uint8)
    ctypes.memmove(raw.data_ptr(), torch.ops.mkldnn.data_ptr(packed), num_bytes)
    layout = blocked_pairs_layout(weight.contiguous(), raw)
    block, k_padded = layout if layout is not None else (32, None)
    storage = allocate(raw)
    metadata = torch.ops.mkldnn._get_mkldnn_serialized_md(packed)
    return PackedWeight(shim.wrap(storage, packed.shape, metadata), storage, k_padded, block)


class _PackedGemm:
    """ctypes view of csrc/packed_gemm_bf16.c (built where the CPU has AVX512-BF16)."""

    def __init__(self):
        library = load_library(PACKED_GEMM_SOURCE)
        set_bf16_dot(library)
        self.kernel = library.packed_gemm_bf16
        self.kernel.restype = ctypes.c_int64
        pointer, integer = ctypes.c_void_p, ctypes.c_int64
        self.kernel.argtypes = [pointer, integer, pointer, pointer] + [integer] * 8
        self.silu_mul_kernel = library.packed_gemm_silu_mul_bf16
        self.silu_mul_kernel.restype = ctypes.c_int64
        self.silu_mul_kernel.argtypes = [pointer, integer, pointer, pointer, pointer] + [integer] * 6

    def takes(self, x: torch.Tensor, weight: PackedWeight, out: torch.Tensor) -> bool:
        max_rows = WIDE_MAX_ROWS if weight.shape[0] > WIDE_OUTPUTS else SKINNY_MAX_ROWS
        return (weight.k_padded is not None and 0 < x.shape[0] <= max_rows and x.dtype == torch.bfloat16
                and x.dim() == 2 and x.stride(1) == 1 and out.stride(1) == 1 and x.shape[1] == weight.shape[1]
                and out.shape == (x.shape[0], weight.shape[0]) and out.dtype in (torch.bfloat16, torch.float32))

    def __call__(self, x: torch.Tensor, weight: PackedWeight, out: torch.Tensor) -> torch.Tensor:
        if self.kernel(x.data_ptr(), x.stride(0), weight.storage.data_ptr(), out.data_ptr(), out.stride(0),
                       int(out.dtype == torch.float32), x.shape[0], weight.shape[0], weight.shape[1], weight.k_padded,
                       weight.block, torch.get_num_threads()):
            raise _no_memory(x)
        return out

    def gate_up_silu(self, x: torch.Tensor, weight: PackedWeight, gate_up: torch.Tensor, act: torch.Tensor) -> bool:
        """TorchLinear.gate_up_silu in one parallel region (packed_gemm_silu_mul_bf16): False where the product
        is not this kernel's or the gate/up halves do not split at an output block."""
        inter = weight.shape[0] // 2
        if not (self.takes(x, weight, gate_up) and gate_up.dtype == torch.bfloat16 and gate_up.is_contiguous()
                and weight.shape[0] % 2 == 0 and inter % weight.block == 0 and act.dtype == torch.bfloat16
                and act.is_contiguous() and act.shape == (x.shape[0], inter)):
            return False
        status = self.silu_mul_kernel(x.data_ptr(), x.stride(0), weight.storage.data_ptr(), gate_up.data_ptr(),
                                      act.data_ptr(), x.shape[0], inter, weight.shape[1], weight.k_padded, weight.block,
                                      torch.get_num_threads())
        if status == -1:
            raise _no_memory(x)
        return status == 0


def _no_memory(x: torch.Tensor) -> MemoryError:
    """What either packed kernel's -1 (its copy of x could not be allocated) is raised as."""
    return MemoryError(f"packed GEMM: no memory for the fp32 copy of a {tuple(x.shape)} input")


def onednn_rows(rows: int) -> int:
    """The row count oneDNN runs a product of `rows` rows at (see ONEDNN_ROW_BUCKET)."""
    bucket = ONEDNN_ROW_BUCKET if rows <= ONEDNN_ROW_BUCKET_UNTIL else ONEDNN_WIDE_ROW_BUCKET
    return -(-rows // bucket) * bucket


def onednn_product(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) in oneDNN, its rows padded to `onednn_rows` with zeros (a fresh input copy only
    then); returns the product's first x.shape[0] rows (a view of oneDNN's fresh result)."""
    rows = x.shape[0]
    padded = onednn_rows(rows)
    if padded != rows:
        grown = x.new_empty((padded, x.shape[1]))
        grown[:rows].copy_(x)
        grown[rows:].zero_()
        x = grown
    return torch.ops.mkldnn._linear_pointwise(x, weight.tensor, bias, "none", [], "")[:rows]


def onednn_available() -> bool:
    """bf16 oneDNN kernels are fast only with AVX512-BF16 or AMX (on AVX2 bf16 is emulated and slow)."""
    return (torch.backends.mkldnn.is_available()
            and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))


class OneDnnLinear(TorchLinear):
    """Packs bf16 CPU weights at `place`; products with them run in oneDNN. Others go to `fallback`."""

    name = "onednn"

    def __init__(self, fallback: TorchLinear | None = None):
        if not onednn_available():
            raise RuntimeError("oneDNN bf16 needs AVX512-BF16 or AMX")
        self.fallback = fallback or TorchLinear()
        self._shim = _BlobShim()
        try:
            self._skinny: _PackedGemm | None = _PackedGemm()
        except (RuntimeError, OSError):  # no AVX512-BF16 to build it for (AMX alone): oneDNN for every size
            self._skinny = None
        try:  # SiLU x up straight from oneDNN's gate/up product (gate_up_silu)
            self._silu: NativeBf16Elementwise | None = NativeBf16Elementwise()
        except (RuntimeError, OSError):
            self._silu = None

    def place(self, weight: torch.Tensor, allocate: Allocator):
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            return self.fallback.place(weight, allocate)
        return pack(weight, allocate, self._shim)

    def place_tied(self, embed: torch.Tensor, allocate: Allocator) -> tuple:
        """bf16: the plain embedding for `rows` and a packed copy for the products; else the fallback's way."""
        if embed.dtype != torch.bfloat16 or embed.device.type != "cpu":
            return self.fallback.place_tied(embed, allocate)
        plain = allocate(embed)
        return plain, self.place(plain, allocate)

    def rows(self, weight, ids, out):
        return self.fallback.rows(weight, ids, out)

    def gate_up_silu(self, x, weight, gate_up, act) -> bool:
        """The packed kernel's fused product and SiLU x up where it takes the product; else oneDNN's product, whose
        fresh result (torch returns a new tensor) SiLU x up reads directly, instead of copying it into gate_up
        first (2,048 rows: a 12 MB copy per layer)."""
        if not isinstance(weight, PackedWeight):
            return False
        if self._skinny is not None and self._skinny.gate_up_silu(x, weight, gate_up, act):
            return True
        if self._silu is None or act.dtype != torch.bfloat16 or not act.is_contiguous():
            return False
        self._silu.silu_mul(onednn_product(x, weight), act)
        return True

    def __call__(self, x, weight, out, bias=None):
        if not isinstance(weight, PackedWeight):
            return self.fallback(x, weight, out, bias)
        if bias is None and self._skinny is not None and self._skinny.takes(x, weight, out):
            return self._skinny(x, weight, out)
        return out.copy_(onednn_product(x, weight, bias))


@contextlib.contextmanager
def packed_routine(dot: str | None = None, tiles_from: int | None = None) -> Iterator[None]:
    """The packed kernel's library computing with `dot` and tiles from `tiles_from` rows (as set_bf16_dot) inside
    the block, this process's own choice again after it (benchmarks and tests compare the routines)."""
    library = load_library(PACKED_GEMM_SOURCE)
    set_bf16_dot(library, dot, tiles_from)
    try:
        yield
    finally:
        set_bf16_dot(library)


def _without_tiles(skinny: _PackedGemm, x: torch.Tensor, weight: PackedWeight, out: torch.Tensor) -> torch.Tensor:
    with packed_routine(tiles_from=0):
        return skinny(x, weight, out)


def _benchmark() -> None:
    """Per-linear time of SmolLM2's shapes: torch.mm, oneDNN on the packed weight, and the packed small-batch
    kernel (with AMX: on tiles, "skinny", and on its vector routine, "vector"), interleaved (medians of 30).
    Each product gets its own copy of the weight, 8 copies in turn, so the weights stream from memory as in a
    model's step (one cached weight flatters every contender)."""
    import time

    linear = OneDnnLinear(TorchLinear())
    skinny = linear._skinny
    tiles = amx_rows() > 0
    for out_features, in_features in ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)):
        copies = 2 if out_features > 10000 else 8
        weights = [torch.randn(out_features, in_features).bfloat16() for _ in range(copies)]
        packed = [linear.place(weight, lambda tensor: tensor.clone()) for weight in weights]
        for rows in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 2048):
            x = torch.randn(rows, in_features).bfloat16()
            out = torch.empty(rows, out_features, dtype=torch.bfloat16)
            runs = {"torch.mm": lambda i, x=x, out=out, weights=weights: torch.mm(x, weights[i].t(), out=out),
                    "onednn": lambda i, x=x, out=out, packed=packed: out.copy_(
                        torch.ops.mkldnn._linear_pointwise(x, packed[i].tensor, None, "none", [], ""))}
            if skinny is not None and packed[0].k_padded is not None:
                runs["skinny"] = lambda i, x=x, out=out, packed=packed: skinny(x, packed[i], out)
                if tiles:  # the packed kernel on AMX tiles ("skinny") and on its vector routine
                    runs["vector"] = lambda i, x=x, out=out, packed=packed: _without_tiles(skinny, x, packed[i], out)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for repeat in range(30):
                for name, run in runs.items():
                    started = time.perf_counter()
                    run(repeat % copies)
                    times[name].append(time.perf_counter() - started)
            medians = {name: sorted(values)[len(values) // 2] * 1e6 for name, values in times.items()}
            print(f"{out_features}x{in_features} rows {rows:4d}: " + "  ".join(
                f"{name} {value:7.0f} us" for name, value in medians.items()))


if __name__ == "__main__":
    import argparse

    argparse.ArgumentParser(description="Per-linear time of SmolLM2's bf16 shapes: torch.mm, oneDNN on the packed "
                            "weight, and the packed small-batch kernel (medians of 30, interleaved).").parse_args()
    _benchmark()
