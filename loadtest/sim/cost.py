"""The cost model: how long one engine step takes for a model on a device (a roofline per part of the step).

A step computes T tokens (one per decode, n per prefill chunk) and samples S rows. Its time is

    linear    max(2·P_linear·T + 2·P_head·S  FLOP / (flops·gemm_eff),  weights bytes / (hbm·mem_eff))
  + attention max(4·H·d·pairs  FLOP / (flops·attn_eff),  KV bytes read and written / (hbm·mem_eff))
  + kernels   num_layers · kernels_per_layer · kernel_overhead
  + host      sequences in the step · seq_overhead

`pairs` counts (query, key) pairs summed over layers: a decode at context c attends min(c, window) keys
per layer; a prefill chunk of n tokens after s cached ones attends Σ min(p + 1, window) over its positions.
KV bytes: each decode reads its attended keys and values once per layer, each prefill chunk reads its
context once per layer (FlashAttention tiles keep it on chip), and every new token writes its K and V.
Weights are read once per step (the batch shares them). Sliding layers cap both pairs and KV reads at
the window, which is what makes Gemma-3-class models cheap at long contexts.

On a device without overlap (`DeviceSpec.overlap=False`: our CPU engine, as its calibration shows) each
part's compute and memory times add up instead of the larger one counting.

Offloaded layers (LayerKV): a step that stages host-resident KV pages is a pipeline of one compute engine
and one copy engine, in the order engine/core/layer_staging.py's `LayerStager` issues work: layers 0 and 1
are fetched before layer 0 runs; after layer l computes, its written pages go back to the host and the
fetch of layer l + 2 starts (neither before layer l ends: the copy stream waits on the compute stream);
layer l computes once its own fetch has landed; the step ends when both engines are done. Each layer's
compute is the step's compute time over the number of layers (identical decoder layers); a copy takes
its bytes over the device's host link (`pcie_bytes_per_s · pcie_efficiency`). In steady state a layer
costs max(compute, write-back + fetch): copies hide behind compute until they are the longer of the two.

Limits: no tensor parallelism (one device per replica), no communication inside a step, no CUDA-graph
padding, no quantisation, sampling cost folded into `seq_overhead`. docs/SIMULATOR.md lists the sources
of each device constant and the calibration against this box.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from loadtest.sim.hardware import DeviceSpec
from loadtest.sim.models import ModelSpec


@dataclass(frozen=True)
class StepShape:
    """What the cost of a step depends on (built from a SchedulerOutput by the executor)."""

    decode_contexts: tuple[int, ...] = ()  # keys each decode attends (its position + 1)
    prefills: tuple[tuple[int, int], ...] = ()  # (num_tokens, start) per prefill chunk
    num_sampled: int = 0
    staged: tuple[tuple[int, int], ...] = ()  # per layer: (bytes fetched from the host, bytes written back)

    @property
    def num_tokens(self) -> int:
        return len(self.decode_contexts) + sum(n for n, _ in self.prefills)

    @property
    def num_seqs(self) -> int:
        return len(self.decode_contexts) + len(self.prefills)


def _capped_sum(start: int, stop: int, window: int | None) -> int:
    """Σ min(p, window) for p in [start, stop) (p >= 1)."""
    if window is None or stop <= window:
        return (start + stop - 1) * (stop - start) // 2
    if start >= window:
        return window * (stop - start)
    return (start + window - 1) * (window - start) // 2 + window * (stop - window)


class CostModel:
    """`layers` (default: all) and `head` (the LM head and the per-sequence host work) make it the cost of one
    pipeline stage: KunServe's pair runs layers [0, split) on one replica and the rest + the head on the other."""

    def __init__(self, model: ModelSpec, device: DeviceSpec, layers: range | None = None, head: bool = True):
        self.model = model
        self.device = device
        layers = range(model.num_layers) if layers is None else layers
        self.num_layers = len(layers)
        windows: dict[int | None, int] = {}
        for layer in layers:
            window = model.window_of(layer)
            windows[window] = windows.get(window, 0) + 1
        self._windows = tuple(windows.items())  # (window or None, number of layers)
        d = device
        self._gemm_rate = d.flops * d.gemm_efficiency
        self._attn_rate = d.flops * d.attention_efficiency
        self._mem_rate = d.hbm_bytes_per_s * d.memory_efficiency
        self._fixed_s = self.num_layers * d.kernels_per_layer * d.kernel_overhead_s
        self._attn_flops_per_pair = 4 * model.num_heads * model.head_dim
        self._kv_bytes = model.kv_bytes_per_token_layer
        self._combine = np.maximum if d.overlap else np.add
        self._copy_rate = d.pcie_bytes_per_s * d.pcie_efficiency
        self._linear_params = self.num_layers * model.layer_params
        self._head_params = model.lm_head_params if head else 0
        self._seq_overhead_s = d.seq_overhead_s if head else 0.0

    # ---- one step ---------------------------------------------------------------------------------
    def _linear_s(self, num_tokens, num_sampled):
        flops = 2.0 * self._linear_params * num_tokens + 2.0 * self._head_params * num_sampled
        weight_bytes = (self._linear_params + self._head_params * (np.asarray(num_sampled) > 0)) * \
            self.model.dtype_bytes
        return self._combine(flops / self._gemm_rate, weight_bytes / self._mem_rate)

    def _attention_s(self, pairs, kv_tokens_read, num_tokens):
        """`pairs` and `kv_tokens_read` summed over layers already."""
        kv_bytes = self._kv_bytes * (kv_tokens_read + num_tokens * self.num_layers)
        return self._combine(self._attn_flops_per_pair * pairs / self._attn_rate, kv_bytes / self._mem_rate)

    def step_s(self, shape: StepShape) -> float:
        if shape.num_tokens == 0:
            return 0.0
        pairs = kv_read = 0
        for window, num_layers in self._windows:
            cap = window if window is not None else 1 << 62
            decode = sum(min(c, cap) for c in shape.decode_contexts)
            prefill_pairs = sum(_capped_sum(s + 1, s + n + 1, window) for n, s in shape.prefills)
            prefill_read = sum(min(s + n, n + cap - 1) for n, s in shape.prefills)
            pairs += num_layers * (decode + prefill_pairs)
            kv_read += num_layers * (decode + prefill_read)
        seconds = float(self._linear_s(shape.num_tokens, shape.num_sampled) + self._attention_s(
            pairs, kv_read, shape.num_tokens)) + self._fixed_s
        if shape.staged:
            seconds = self.staged_s(seconds, shape.staged)
        return seconds + shape.num_seqs * self._seq_overhead_s

    def staged_s(self, compute_s: float, staged: tuple[tuple[int, int], ...]) -> float:
        """A step of `compute_s` on the device whose layers stage `staged` bytes (see the module doc)."""
        layer_s = compute_s / len(staged)
        fetch = [fetched / self._copy_rate for fetched, _ in staged]
        back = [written / self._copy_rate for _, written in staged]
        copy_end = fetch[0] + (fetch[1] if len(staged) > 1 else 0.0)
        ready = [fetch[0], copy_end]  # when layers 0 and 1 have landed
        compute_end = 0.0
        for layer in range(len(staged)):
            compute_end = max(compute_end, ready[layer]) + layer_s
            copy_end = max(copy_end, compute_end) + back[layer]
            if layer + 2 < len(staged):
                copy_end += fetch[layer + 2]
                ready.append(copy_end)
        return max(compute_end, copy_end)

    def host_link_s(self, num_bytes: int) -> float:
        """Bytes over the host link, either way (the engine's StepCostModel learns its rate as copy bandwidth)."""
        return num_bytes / self._copy_rate

    def decode_steps_s(self, contexts: Sequence[int], num_steps: int) -> np.ndarray:
        """Times of `num_steps` decode-only steps of the same batch, every context one longer each step."""
        base = np.asarray(contexts, dtype=np.int64)
        batch = len(base)
        steps = np.arange(num_steps, dtype=np.int64)
        pairs = np.zeros(num_steps, dtype=np.float64)
        for window, num_layers in self._windows:
            if window is None:  # full attention: every context grows by one per step
                attended = int(base.sum()) + batch * steps
            else:
                attended = np.minimum(base[None, :] + steps[:, None], window).sum(axis=1)
            pairs += num_layers * attended
        seconds = self._linear_s(batch, batch) + self._attention_s(pairs, pairs, batch)
        return np.broadcast_to(seconds, (num_steps,)) + self._fixed_s + batch * self._seq_overhead_s

    # ---- whole operations ------------------------------------------------------------------------
    def prefill_s(self, num_tokens: int, chunk: int) -> float:
        """A lone request's prefill of `num_tokens` in chunks of `chunk` tokens (recompute after migration)."""
        seconds, start = 0.0, 0
        while start < num_tokens:
            n = min(chunk, num_tokens - start)
            seconds += self.step_s(StepShape((), ((n, start),), int(start + n == num_tokens)))
            start += n
        return seconds

    def copy_s(self, num_tokens: int) -> float:
        """Moving a request's KV to another replica over the network (every layer's K and V)."""
        return num_tokens * self.model.kv_bytes_per_token / self.device.network_bytes_per_s

    def migration_cost_inputs(self, max_num_batched_tokens: int) -> dict[str, float]:
        """The inputs of deployments.migration.source.choose_mode (the live source's copy-or-recompute
        choice), in the linear form the live engine fits (`StepCostModel`): base + per_token · tokens."""
        full = self.step_s(StepShape((), ((max_num_batched_tokens, 0),), 1))
        one = self.step_s(StepShape((), ((1, 0),), 1))
        per_token_ms = max(0.0, (full - one) / (max_num_batched_tokens - 1)) * 1e3 if max_num_batched_tokens > 1 \
            else 0.0
        return {"kv_bytes_per_token": self.model.kv_bytes_per_token, "step_base_ms": one * 1e3,
                "step_per_token_ms": per_token_ms, "max_num_batched_tokens": max_num_batched_tokens}
