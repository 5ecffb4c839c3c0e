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

Only bf16 CPU weights are packed; everything else goes to the wrapped fallback backend (native / torch),
so fp32 outputs are unchanged.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.model.linear import Allocator, TorchLinear

# oneDNN picks a blocked layout by the batch-size hint; the layout for hint 1 is a GEMV layout that is slow
# from a few rows on, while the one for 16+ serves every batch size (decode and prefill) well.
PACK_BATCH_HINT = 16


@dataclass(frozen=True)
class PackedWeight:
    """An `_mkldnn` tensor over `storage` (uint8 arena bytes that must outlive it), logical shape [out, in]."""

    tensor: torch.Tensor
    storage: torch.Tensor

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


def pack(weight: torch.Tensor, allocate: Allocator, shim: _BlobShim) -> PackedWeight:
    """`weight` [out, in] bf16 packed for oneDNN, its bytes placed by `allocate`."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_BATCH_HINT)
    num_bytes = torch.ops.mkldnn._nbytes(packed)
    raw = torch.empty(num_bytes, dtype=torch.uint8)
    ctypes.memmove(raw.data_ptr(), torch.ops.mkldnn.data_ptr(packed), num_bytes)
    storage = allocate(raw)
    metadata = torch.ops.mkldnn._get_mkldnn_serialized_md(packed)
    return PackedWeight(shim.wrap(storage, packed.shape, metadata), storage)


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

    def place(self, weight: torch.Tensor, allocate: Allocator):
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            return self.fallback.place(weight, allocate)
        return pack(weight, allocate, self._shim)

    def __call__(self, x, weight, out, bias=None):
        if not isinstance(weight, PackedWeight):
            return self.fallback(x, weight, out, bias)
        result = torch.ops.mkldnn._linear_pointwise(x, weight.tensor, bias, "none", [], "")
        return out.copy_(result)


def _benchmark() -> None:
    """Per-linear time of SmolLM2's shapes, torch.mm vs packed, interleaved (medians of 30)."""
    import time

    linear = OneDnnLinear(TorchLinear())
    for out_features, in_features in ((960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)):
        weight = torch.randn(out_features, in_features).bfloat16()
        packed = linear.place(weight, lambda tensor: tensor.clone())
        for rows in (1, 4, 16, 64, 512):
            x = torch.randn(rows, in_features).bfloat16()
            out = torch.empty(rows, out_features, dtype=torch.bfloat16)
            times: dict[str, list[float]] = {"mm": [], "packed": []}
            for _ in range(30):
                for name, stored in (("mm", weight), ("packed", packed)):
                    started = time.perf_counter()
                    linear(x, stored, out)  # a plain tensor goes to the fallback: torch.mm
                    times[name].append(time.perf_counter() - started)
            mm, pk = (sorted(values)[len(values) // 2] * 1e6 for values in times.values())
            print(f"{out_features}x{in_features} rows {rows:4d}: torch.mm {mm:8.0f} us  packed {pk:8.0f} us  "
                  f"{mm / pk:5.2f}x")


if __name__ == "__main__":
    _benchmark()
