"""Loads the C decode-attention kernels (csrc/decode_attention.c), built by engine/native_build.py, and calls
them for either KV layout. If they cannot be built (no compiler), callers fall back to the pure-torch backends.

The kernels see a layer's cache as pages of token rows: the contiguous layout's `[max_slots, max_len, kvh, d]`
is one page per slot (no block table); the paged layout's `[num_pages, page_tokens, kvh, d]` is read through
its block table `[max_slots, pages_per_slot]`."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from engine.attention.base import LayerAttentionSpec
from engine.core.forward_batch import ForwardBatch
from engine.native_build import FLAGS, amx_tiles_allowed, load_library

_SOURCE = Path(__file__).parent / "csrc" / "decode_attention.c"
_PREFILL_SOURCE = Path(__file__).parent / "csrc" / "prefill_attention.c"
_PREFILL_F32_SOURCE = Path(__file__).parent / "csrc" / "prefill_attention_f32.c"
_KERNELS = {torch.float32: "decode_attention_f32", torch.bfloat16: "decode_attention_bf16"}


def load_decode_kernels(flags: tuple[str, ...] = FLAGS) -> ctypes.CDLL:
    """The compiled kernel library (built on first use; `flags`: see load_library). Raises RuntimeError when it
    cannot be built."""
    library = load_library(_SOURCE, flags)
    int64, pointer = ctypes.c_int64, ctypes.c_void_p
    for name in _KERNELS.values():
        function = getattr(library, name)
        function.restype = None
        function.argtypes = [pointer, pointer, pointer, int64, int64, int64, pointer, int64, pointer, pointer, int64,
                             int64, int64, int64, int64, ctypes.c_float, pointer, int64]
    library.store_rows.restype = int64
    library.store_rows.argtypes = [pointer, int64, int64, int64, int64, pointer, int64, int64, pointer, pointer,
                                   int64, pointer, int64, int64]
    return library


_P, _I = ctypes.c_void_p, ctypes.c_int64
_PREFILL_ARGTYPES = [_P, _I, _P, _P,  # q, q_stride, k_cache, v_cache
                     _I, _I, _I, _P, _I,  # page_stride, token_stride, page_tokens, tables, table_stride
                     _P, _P, _P, _P, _I,  # slots, starts, offsets, lens, num_chunks
                     _I, _I, _I, _I, ctypes.c_float,  # num_heads, num_kv_heads, head_dim, window, scale
                     _P, _I, _I]  # out, out_stride, num_threads


def _prefill_function(source: Path, name: str, available: str, flags: tuple[str, ...]):
    """`name` of the compiled `source`, or None where the CPU lacks what it needs (`available()` says 0)."""
    library = load_library(source, flags)
    available = getattr(library, available)
    available.restype = ctypes.c_int64
    if not available():
        return None
    function = getattr(library, name)
    function.restype, function.argtypes = ctypes.c_int64, _PREFILL_ARGTYPES
    return function


def load_prefill_kernels(flags: tuple[str, ...] = FLAGS) -> dict[torch.dtype, object]:
    """The prefill kernels by cache dtype: bf16 (csrc/prefill_attention.c) where the CPU has AVX512-BF16, its
    products on AMX tiles where it has them (`amx_tiles_allowed`); fp32 (csrc/prefill_attention_f32.c) where it
    has AVX2/FMA. A dtype without one keeps scaled_dot_product_attention for prompts. Raises RuntimeError when
    they cannot be built."""
    kernels = {}
    bf16 = _prefill_function(_PREFILL_SOURCE, "prefill_attention_bf16", "prefill_attention_available", flags)
    if bf16 is not None:
        set_prefill_tiles(amx_tiles_allowed(), flags)
        kernels[torch.bfloat16] = bf16
    f32 = _prefill_function(_PREFILL_F32_SOURCE, "prefill_attention_f32", "prefill_attention_f32_available",
                            flags)
    if f32 is not None:
        kernels[torch.float32] = f32
    return kernels


def set_prefill_tiles(on: bool, flags: tuple[str, ...] = FLAGS) -> bool:
    """The bf16 prefill kernel's products on AMX tiles (on) or vdpbf16ps (off); True when tiles are on. Not while a
    call runs."""
    library = load_library(_PREFILL_SOURCE, flags)
    library.prefill_attention_set_tiles.restype = ctypes.c_int64
    library.prefill_attention_set_tiles.argtypes = [ctypes.c_int64]
    return bool(library.prefill_attention_set_tiles(int(on)))


def rows_in_place(cache: torch.Tensor) -> bool:
    """Whether the kernels can address `cache` ([pages or slots, tokens, kvh, d]): CPU, a dtype they take,
    each token's heads one contiguous row."""
    return (cache.device.type == "cpu" and cache.dtype in _KERNELS and cache.stride(-1) == 1
            and cache.stride(2) == cache.shape[3])


def _table_args(table: torch.Tensor | None) -> tuple[int, int, int]:
    if table is None:
        return 0, 0, 0
    return table.data_ptr(), table.shape[0], table.stride(0)


def decode_in_place(library: ctypes.CDLL, spec: LayerAttentionSpec, q: torch.Tensor, key_cache: torch.Tensor,
           value_cache: torch.Tensor, table: torch.Tensor | None, slots: torch.Tensor, lens: torch.Tensor,
           out: torch.Tensor) -> None:
    """out[b] = attention of q[b] over the first lens[b] tokens of the sequence in slot slots[b] (the last
    `sliding_window` of them), read in place. `table`: the paged layout's block table (int64, contiguous);
    None for the contiguous layout. `slots` and `lens` are contiguous int64."""
    query = q.float().contiguous()
    result = out if out.dtype == torch.float32 and out.is_contiguous() else torch.empty_like(query)
    table_ptr, _, table_stride = _table_args(table)
    getattr(library, _KERNELS[key_cache.dtype])(
        query.data_ptr(), key_cache.data_ptr(), value_cache.data_ptr(), key_cache.stride(0), key_cache.stride(1),
        key_cache.shape[1], table_ptr, table_stride, slots.data_ptr(), lens.data_ptr(), q.shape[0],
        spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.sliding_window or 0, spec.head_dim ** -0.5,
        result.data_ptr(), torch.get_num_threads(),
    )
    if result is not out:
        out.copy_(result)


def prefill_in_place(kernels: dict[torch.dtype, object], spec: LayerAttentionSpec, q: torch.Tensor,
                     key_cache: torch.Tensor, value_cache: torch.Tensor, table: torch.Tensor | None,
                     batch: ForwardBatch, out: torch.Tensor) -> bool:
    """out rows of every prompt chunk = its causal (windowed) attention over its sequence's cache, which
    already holds the chunk's K/V, read in place (q, cache and out of one dtype, `kernels`' key). False (nothing
    written) for a dtype without a kernel or a shape the kernel does not take; the caller then attends with
    SDPA."""
    kernel = kernels.get(key_cache.dtype)
    if not (kernel is not None and q.dtype == out.dtype == key_cache.dtype and q.stride(-1) == 1
            and q.stride(1) == spec.head_dim and out.stride(-1) == 1 and out.stride(1) == spec.head_dim
            and key_cache.stride() == value_cache.stride() and rows_in_place(key_cache)):
        return False
    arrays = batch.prefill_arrays
    table_ptr, _, table_stride = _table_args(table)
    return kernel(
        q.data_ptr(), q.stride(0), key_cache.data_ptr(), value_cache.data_ptr(), key_cache.stride(0),
        key_cache.stride(1), key_cache.shape[1], table_ptr, table_stride, arrays[0].data_ptr(), arrays[1].data_ptr(),
        arrays[2].data_ptr(), arrays[3].data_ptr(), arrays.shape[1], spec.num_heads, spec.num_kv_heads,
        spec.head_dim, spec.sliding_window or 0, spec.head_dim ** -0.5, out.data_ptr(), out.stride(0),
        torch.get_num_threads()) == 0


def store_rows(library: ctypes.CDLL, cache: torch.Tensor, table: torch.Tensor | None, slots: torch.Tensor,
          positions: torch.Tensor, values: torch.Tensor) -> None:
    """cache row of (slots[i], positions[i]) = values[i], one memcpy per row; IndexError (nothing written) for
    a row outside the cache or, paged, on a page the slot does not hold."""
    size = cache.element_size()
    table_ptr, table_rows, table_stride = _table_args(table)
    bad = library.store_rows(cache.data_ptr(), cache.shape[0], cache.stride(0) * size, cache.shape[1],
                             cache.stride(1) * size, table_ptr, table_rows, table_stride, slots.data_ptr(),
                             positions.data_ptr(), values.shape[0], values.data_ptr(), values.stride(0) * size,
                             cache.shape[2] * cache.shape[3] * size)
    if bad:
        where = "outside the cache" if table is None else "outside the block table or on a page it does not hold"
        raise IndexError(f"KV row {bad - 1}: slot {int(slots[bad - 1])} position {int(positions[bad - 1])} {where} "
                         f"{tuple(cache.shape[:2])}")


def can_store(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> bool:
    """Whether `store_rows` takes these: rows in place in both, same dtype, int64 contiguous indices."""
    return (rows_in_place(cache) and values.device.type == "cpu" and cache.dtype == values.dtype
            and values.stride(-1) == 1 and values.stride(1) == cache.shape[3]
            and slots.dtype == positions.dtype == torch.int64 and slots.is_contiguous() and positions.is_contiguous())
