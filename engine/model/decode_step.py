"""A decode step's layers in one native call (csrc/decode_step_bf16.c), for bf16 Llama-family models on
AVX512-BF16 CPUs: pure decode steps of up to `MAX_ROWS` rows (products on AMX tiles where the CPU has them).

The per-op path runs ~10 kernel calls per layer (~300 per step for SmolLM2), each a Python call and a fork/join
of the OpenMP team; under `OMP_WAIT_POLICY=PASSIVE` or on a busy box every join sleeps and every fork wakes a
thread, and the decode attention ran one sequence per thread. `DecodeStep` runs all layers in one parallel
region with a spinning barrier between phases (see the C file), computing every value with the same routines
as the per-op kernels, so its bits equal that path's with the packed GEMM for every product. Beyond ~8 rows the
step is bound by the products' FLOPs rather than the weights' bytes; the packed GEMM's fp32 FMAs (csrc/
packed_gemm_bf16.h) then set its pace, and the fused call saves the per-op path's ~300 fork/joins.

`DecodeStep.for_model` returns None unless every piece it replaces is the native one: weights packed in the
layout the packed GEMM reads (engine/model/onednn_linear.py), the native bf16 elementwise ops, the native decode
attention over the contiguous KV layout, no tensor parallelism, no biases or q/k norms. `takes` then accepts a
step of pure decode rows, at most `MAX_ROWS`, over all layers, with no layer hook (layer-wise KV offload).
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from engine.attention.native import rows_in_place
from engine.attention.native_decode import NativeDecodeBackend
from engine.core.forward_batch import ForwardBatch
from engine.model.elementwise import NativeBf16Elementwise
from engine.model.onednn_linear import PackedWeight, set_bf16_dot
from engine.native_build import load_library

logger = logging.getLogger(__name__)
# decode steps of at most this many rows take the fused step: any the engine makes (max_num_seqs is 64 by
# default). Without AMX the packed kernel beats oneDNN at every size there; with AMX its tile routine does, and
# the fused step beat the per-op path at 1-128 rows (2026-12-06, Xeon with AMX, 2 threads: 18.5 vs 29.3 ms at
# batch 1, 34.6 vs 54.2 at 16, 77.5 vs 87.2 at 64; `python -m loadtest.bench.decode_step`)
MAX_ROWS = 256
_MAX_GROUP = 7  # query heads per key/value head the vector attention takes (decode_attention_bf16.h)


class _Packed(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64),
                ("k_padded", ctypes.c_int64), ("block", ctypes.c_int64)]


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Packed), ("o", _Packed),
                ("gate_up", _Packed), ("down", _Packed), ("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p),
                ("slot_stride", ctypes.c_int64), ("token_stride", ctypes.c_int64), ("max_len", ctypes.c_int64),
                ("num_slots", ctypes.c_int64), ("window", ctypes.c_int64)]


class _Shape(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("num_heads", ctypes.c_int64),
                ("num_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("rope_table", ctypes.c_void_p)]


def _packed(weight: PackedWeight) -> _Packed:
    out_features, in_features = weight.shape
    return _Packed(weight.storage.data_ptr(), out_features, in_features, weight.k_padded, weight.block)


def _kernel():
    library = load_library(Path(__file__).parent / "csrc" / "decode_step_bf16.c")
    set_bf16_dot(library)  # the packed kernel's routine: the same bits as the per-op path's products
    function = library.decode_step_bf16
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 8 + [ctypes.c_int64]
    return function


class DecodeStep:
    def __init__(self, model):
        self.model = model
        self._kernel = _kernel()
        c = model.config
        self._rope = model.rope_table  # [positions, 2, head_dim], contiguous (checked in for_model)
        self._shape = _Shape(c.num_layers, c.hidden_size, model.num_heads, model.num_kv_heads, c.head_dim,
                             len(model.shard.mlp_columns), c.rms_norm_eps, c.head_dim ** -0.5, self._rope.data_ptr())
        self._layers = None
        self._layers_key: tuple[int, ...] = ()

    @classmethod
    def for_model(cls, model) -> DecodeStep | None:
        """The fused step for `model` (a LlamaModel), or None where any piece it replaces is not native."""
        c = model.config
        if (model.dtype != torch.bfloat16 or model.embed.device.type != "cpu" or model.all_reduce is not None
                or type(model.attention) is not NativeDecodeBackend or not isinstance(model.ops, NativeBf16Elementwise)
                or c.head_dim % 64 or model.num_heads // model.num_kv_heads > _MAX_GROUP
                or not model.rope_table.is_contiguous()):
            return None
        for layer in model.layers:
            weights = [layer[name] for name in ("qkv", "o", "gate_up", "down")]
            if ("qkv_bias" in layer or "q_norm" in layer
                    or not all(isinstance(w, PackedWeight) and w.k_padded is not None for w in weights)):
                return None
        try:
            return cls(model)
        except (RuntimeError, OSError) as error:
            logger.warning("fused bf16 decode step unavailable (%s); per-op path", error)
            return None

    def takes(self, batch: ForwardBatch, kv_caches, layers: range, layer_hook) -> bool:
        num_tokens = batch.num_tokens
        return (0 < num_tokens <= MAX_ROWS and batch.num_decode_tokens == num_tokens and layer_hook is None
                and layers == range(self.model.config.num_layers) and not self.model.dropped_layers
                and all(type(k) is torch.Tensor and k.dim() == 4 and rows_in_place(k) and rows_in_place(v)
                        and k.stride() == v.stride() and k.shape == v.shape for k, v in kv_caches))

    def _layer_table(self, kv_caches) -> ctypes.Array:
        key = tuple(pointer for k, v in kv_caches for pointer in (k.data_ptr(), v.data_ptr()))
        if key != self._layers_key:
            rows = []
            for layer, (k, v) in zip(self.model.layers, kv_caches, strict=True):
                rows.append(_Layer(layer["input_norm"].data_ptr(), layer["post_norm"].data_ptr(), _packed(layer["qkv"]),
                                   _packed(layer["o"]), _packed(layer["gate_up"]), _packed(layer["down"]),
                                   k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.shape[1], k.shape[0],
                                   layer["spec"].sliding_window or 0))
            self._layers, self._layers_key = (_Layer * len(rows))(*rows), key
        return self._layers

    def run(self, batch: ForwardBatch, kv_caches, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """Runs every layer over buffers["hidden"] (the embedded tokens); returns that buffer."""
        hidden = buffers["hidden"]
        scratch = [buffers[name] for name in ("normed", "qkv", "attn", "proj", "gate_up", "act")]
        if not all(tensor.is_contiguous() for tensor in (hidden, *scratch)):
            raise ValueError("the fused decode step needs contiguous workspace buffers")
        slots, positions = batch.token_slots.contiguous(), batch.positions.contiguous()
        bad = self._kernel(ctypes.byref(self._shape), self._layer_table(kv_caches), hidden.data_ptr(), hidden.shape[0],
                           slots.data_ptr(), positions.data_ptr(), *(tensor.data_ptr() for tensor in scratch),
                           torch.get_num_threads())
        if bad:
            raise IndexError(f"KV row {bad - 1}: slot {int(slots[bad - 1])} position {int(positions[bad - 1])} "
                             "outside the cache")
        return hidden
