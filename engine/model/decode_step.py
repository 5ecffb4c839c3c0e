"""A decode step's layers in one native call, for Llama-family models on CPUs: pure decode steps of up to
`MAX_ROWS` rows, in one of two variants (`DecodeStep.for_model` picks the one the model's dtype and kernels fit):

- `Bf16DecodeStep` (csrc/decode_step_bf16.c): bf16 weights packed for oneDNN (engine/model/onednn_linear.py) on
  AVX512-BF16 CPUs (products on AMX tiles where the CPU has them); every value computed by the per-op kernels'
  routines, so its bits equal the per-op path's with the packed GEMM for every product.
- `F32DecodeStep` (csrc/decode_step_f32.c): fp32 on AVX2/FMA CPUs, the weights in the per-op path's panels
  (engine/model/linear.py `PanelWeight`), products by the per-op path's own fp32 kernel (csrc/gemm_f32.h, the
  same bits); the norms, RoPE, SiLU and attention in C (a few ulps from torch's fp32 ops; greedy tokens held to
  transformers' by the exactness tests).

The per-op path runs ~10-35 kernel calls per layer (~300-1,000 per step for SmolLM2), each a Python call and a
fork/join of the OpenMP team; under `OMP_WAIT_POLICY=PASSIVE` or on a busy box every join sleeps and every fork
wakes a thread, and a thread that loses its core holds its partner at every join. A fused step runs all layers
in one parallel region, its threads claiming work as they get to it (csrc/step_phases.h). Beyond ~8 rows a step
is bound by the products' FLOPs rather than the weights' bytes.

`takes` accepts a step of pure decode rows, at most `MAX_ROWS`, over all layers, with no layer hook (layer-wise
KV offload), no dropped layers, every KV cache in the contiguous layout.
"""

from __future__ import annotations

import ctypes
import logging
from abc import ABC, abstractmethod
from pathlib import Path

import torch

from engine.attention.native import rows_in_place
from engine.attention.native_decode import NativeDecodeBackend
from engine.core.forward_batch import ForwardBatch
from engine.model.elementwise import NativeBf16Elementwise
from engine.model.linear import PanelWeight
from engine.model.onednn_linear import PackedWeight, set_bf16_dot
from engine.native_build import load_library

logger = logging.getLogger(__name__)
# decode steps of at most this many rows take the fused step: any the engine makes (max_num_seqs is 64 by
# default). fp32 on AVX2 (2026-12-07, Zen 3 EPYC, 2 threads): 1.42x the per-op path's speed at batch 1, 1.23x
# at 8, 1.08x at 32, 1.11x at 64 (the per-op path with the same products). bf16: without AMX the packed kernel
# beats oneDNN at every size there; with AMX its tile routine does, and the fused step beat the per-op path at
# 1-128 rows (2026-12-06, Xeon with AMX, 2 threads: 18.5 vs 29.3 ms at batch 1, 34.6 vs 54.2 at 16, 77.5 vs
# 87.2 at 64; `python -m loadtest.bench.decode_step`)
MAX_ROWS = 256
_MAX_GROUP = 7  # query heads per key/value head the vector attention takes (decode_attention_bf16.h)


class _Packed(ctypes.Structure):
    _fields_ = [("weight", ctypes.c_void_p), ("out_features", ctypes.c_int64), ("in_features", ctypes.c_int64),
                ("k_padded", ctypes.c_int64), ("block", ctypes.c_int64)]


_CACHE_FIELDS = [("k_cache", ctypes.c_void_p), ("v_cache", ctypes.c_void_p), ("slot_stride", ctypes.c_int64),
                 ("token_stride", ctypes.c_int64), ("max_len", ctypes.c_int64), ("num_slots", ctypes.c_int64),
                 ("window", ctypes.c_int64)]


class _Bf16Layer(ctypes.Structure):
    _fields_ = [("input_norm", ctypes.c_void_p), ("post_norm", ctypes.c_void_p), ("qkv", _Packed), ("o", _Packed),
                ("gate_up", _Packed), ("down", _Packed), *_CACHE_FIELDS]


class _F32Layer(ctypes.Structure):
    _fields_ = [(name, ctypes.c_void_p) for name in ("input_norm", "post_norm", "qkv", "o", "gate_up", "down")]
    _fields_ += _CACHE_FIELDS


class _Shape(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int64), ("hidden", ctypes.c_int64), ("num_heads", ctypes.c_int64),
                ("num_kv_heads", ctypes.c_int64), ("head_dim", ctypes.c_int64), ("intermediate", ctypes.c_int64),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("rope_table", ctypes.c_void_p)]


def _packed(weight: PackedWeight) -> _Packed:
    out_features, in_features = weight.shape
    return _Packed(weight.storage.data_ptr(), out_features, in_features, weight.k_padded, weight.block)


def _load_kernel(source: str, name: str) -> ctypes.CDLL:
    library = load_library(Path(__file__).parent / "csrc" / source)
    function = getattr(library, name)
    function.restype = ctypes.c_int64
    function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 8 + [ctypes.c_int64]
    return library


class DecodeStep(ABC):
    """One variant of the fused step. A variant names its C source and kernel (SOURCE, KERNEL: the kernel takes
    (shape, layers, hidden, rows, slots, positions, six scratch buffers, threads) and returns 0 or the first bad
    row + 1), its layer struct (LAYER: two norm pointers, four product weights, then the cache fields), which
    models it computes (`accepts`) and how a layer's product weights are handed over (`_weights`)."""

    SOURCE = ""
    KERNEL = ""
    LAYER: type[ctypes.Structure] = ctypes.Structure

    def __init__(self, model):
        self.model = model
        self._kernel = getattr(self._library(), self.KERNEL)
        c = model.config
        self._rope = model.rope_table  # [positions, 2, head_dim], contiguous (checked in for_model)
        self._shape = _Shape(c.num_layers, c.hidden_size, model.num_heads, model.num_kv_heads, c.head_dim,
                             len(model.shard.mlp_columns), c.rms_norm_eps, c.head_dim ** -0.5, self._rope.data_ptr())
        self._layers = None
        self._layers_key: tuple[int, ...] = ()

    @classmethod
    def _library(cls) -> ctypes.CDLL:
        return _load_kernel(cls.SOURCE, cls.KERNEL)

    @classmethod
    @abstractmethod
    def accepts(cls, model) -> bool:
        """Whether this variant computes `model`'s decode steps (its dtype, weights and ops)."""

    @abstractmethod
    def _weights(self, layer: dict) -> tuple:
        """LAYER's qkv, o, gate_up and down fields for `layer`'s product weights."""

    @staticmethod
    def for_model(model) -> DecodeStep | None:
        """The fused step for `model` (a LlamaModel), or None where no variant takes it."""
        if (model.embed.device.type != "cpu" or model.all_reduce is not None
                or type(model.attention) is not NativeDecodeBackend or not model.rope_table.is_contiguous()
                or any("qkv_bias" in layer or "q_norm" in layer for layer in model.layers)):
            return None
        for variant in (Bf16DecodeStep, F32DecodeStep):
            if variant.accepts(model):
                try:
                    return variant(model)
                except (RuntimeError, OSError) as error:
                    logger.warning("fused decode step unavailable (%s); per-op path", error)
                    return None
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
            rows = [self.LAYER(layer["input_norm"].data_ptr(), layer["post_norm"].data_ptr(), *self._weights(layer),
                               k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), k.shape[1], k.shape[0],
                               layer["spec"].sliding_window or 0)
                    for layer, (k, v) in zip(self.model.layers, kv_caches, strict=True)]
            self._layers, self._layers_key = (self.LAYER * len(rows))(*rows), key
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


_MATRICES = ("qkv", "o", "gate_up", "down")


class Bf16DecodeStep(DecodeStep):
    SOURCE, KERNEL, LAYER = "decode_step_bf16.c", "decode_step_bf16", _Bf16Layer

    @classmethod
    def _library(cls) -> ctypes.CDLL:
        library = super()._library()
        set_bf16_dot(library)  # the packed kernel's routine: the same bits as the per-op path's products
        return library

    @classmethod
    def accepts(cls, model) -> bool:
        return (model.dtype == torch.bfloat16 and isinstance(model.ops, NativeBf16Elementwise)
                and model.config.head_dim % 64 == 0 and model.num_heads // model.num_kv_heads <= _MAX_GROUP
                and all(isinstance(layer[name], PackedWeight) and layer[name].k_padded is not None
                        for layer in model.layers for name in _MATRICES))

    def _weights(self, layer: dict) -> tuple:
        return tuple(_packed(layer[name]) for name in _MATRICES)


class F32DecodeStep(DecodeStep):
    SOURCE, KERNEL, LAYER = "decode_step_f32.c", "decode_step_f32", _F32Layer

    @classmethod
    def accepts(cls, model) -> bool:
        return (model.dtype == torch.float32 and model.config.head_dim % 8 == 0
                and all(isinstance(layer[name], PanelWeight) for layer in model.layers for name in _MATRICES)
                and all(type(layer[name]) is torch.Tensor and layer[name].is_contiguous()
                        for layer in model.layers for name in ("input_norm", "post_norm")))

    def _weights(self, layer: dict) -> tuple:
        return tuple(layer[name].panels.data_ptr() for name in _MATRICES)
