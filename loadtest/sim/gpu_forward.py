"""A Llama decoder step in plain torch at a ModelSpec's shapes, bf16, replayed from a CUDA graph: the device time
of a step without host overhead, which is what the cost model's roofline describes.

Per layer: RMSNorm, the fused q/k/v product, RoPE, attention (decode: B queries over B caches of `context`
keys through scaled_dot_product_attention with grouped-query heads; prefill: one causal prompt), the o
product, RMSNorm, the fused gate/up product, SiLU x up, the down product, residual adds; then the final norm,
the LM head on the sampled rows and argmax. Weights and KV caches are random, one set per layer, so nothing
one layer reads is still in L2 for the next. Each shape is run eagerly (`eager_seconds`: launch-bound where
kernels are small) and captured once, then replayed (`seconds` = `gpu_seconds`: CUDA events over the
replays). `python -m loadtest.sim gpu-calibrate --record --engine torch-graph` writes these scenarios.
"""

from __future__ import annotations

import time

from loadtest.sim.cost import StepShape
from loadtest.sim.models import ModelSpec

REPLAYS = 20


class _Step:
    """One step's tensors and its forward; `run()` is what the graph captures."""

    def __init__(self, spec: ModelSpec, weights: list[dict], shared: dict, batch: int, tokens: int, context: int,
                 device: str = "cuda"):
        import torch

        self.torch, self.spec, self.weights, self.shared = torch, spec, weights, shared
        self.batch, self.tokens, self.context = batch, tokens, context  # decode: tokens 1; prefill: batch 1
        dtype = torch.bfloat16
        self.ids = torch.randint(3, spec.vocab_size, (batch * tokens,), device=device)
        positions = torch.arange(context - tokens, context, device=device)
        inv = 1.0 / (500000.0 ** (torch.arange(0, spec.head_dim, 2, device=device).float() / spec.head_dim))
        angles = positions[:, None].float() * inv[None, :]
        self.cos, self.sin = angles.cos().to(dtype), angles.sin().to(dtype)
        self.caches = [] if tokens > 1 else [
            tuple(torch.randn(batch, spec.num_kv_heads, context, spec.head_dim, device=device, dtype=dtype)
                  for _ in "kv") for _ in range(spec.num_layers)]

    def _norm(self, x, weight):
        torch = self.torch
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, 1e-5)

    def _rope(self, x):  # x: [rows, heads, tokens, head_dim], rotate-half
        half = x.shape[-1] // 2
        first, second = x[..., :half], x[..., half:]
        cos, sin = self.cos, self.sin
        return self.torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    def run(self):
        torch, spec = self.torch, self.spec
        functional = torch.nn.functional
        b, n, d = self.batch, self.tokens, spec.head_dim
        q_size, kv_size = spec.num_heads * d, spec.num_kv_heads * d
        x = self.shared["embed"][self.ids]
        for layer, w in enumerate(self.weights):
            h = self._norm(x, w["input_norm"])
            qkv = h @ w["qkv"].T
            q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
            q = self._rope(q.view(b, n, spec.num_heads, d).transpose(1, 2))
            k = self._rope(k.view(b, n, spec.num_kv_heads, d).transpose(1, 2))
            v = v.view(b, n, spec.num_kv_heads, d).transpose(1, 2)
            if n == 1:  # decode: the new key and value take the cache's last position
                keys, values = self.caches[layer]
                keys[:, :, -1:].copy_(k)
                values[:, :, -1:].copy_(v)
                attended = functional.scaled_dot_product_attention(q, keys, values, enable_gqa=True)
            else:
                attended = functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            x = x + attended.transpose(1, 2).reshape(b * n, q_size) @ w["o"].T
            gate, up = (self._norm(x, w["post_norm"]) @ w["gate_up"].T).chunk(2, dim=-1)
            x = x + (functional.silu(gate) * up) @ w["down"].T
        last = x.view(b, n, -1)[:, -1]
        return (self._norm(last, self.shared["norm"]) @ self.shared["lm_head"].T).argmax(-1)


def _weights(spec: ModelSpec, device: str = "cuda") -> tuple[list[dict], dict]:
    import torch

    def matrix(rows: int, columns: int):
        return torch.randn(rows, columns, device=device, dtype=torch.bfloat16) * columns ** -0.5

    h, i, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    ones = torch.ones(h, device=device, dtype=torch.bfloat16)
    layers = [{"input_norm": ones, "post_norm": ones, "qkv": matrix(d * (spec.num_heads + 2 * spec.num_kv_heads), h),
               "o": matrix(h, d * spec.num_heads), "gate_up": matrix(2 * i, h), "down": matrix(h, i)}
              for _ in range(spec.num_layers)]
    embed = matrix(spec.vocab_size, h)
    return layers, {"embed": embed, "norm": ones, "lm_head": embed if spec.tie_word_embeddings else matrix(
        spec.vocab_size, h)}


def _time(step: _Step) -> dict:
    import torch

    with torch.inference_mode():
        for _ in range(3):
            step.run()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            step.run().tolist()
        eager = (time.perf_counter() - started) / 5
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step.run()  # warm-up on the capture stream
        torch.cuda.current_stream().wait_stream(stream)
        with torch.cuda.graph(graph):
            step.run()
        graph.replay()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(REPLAYS):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
    seconds = begin.elapsed_time(end) / 1e3 / REPLAYS
    return {"seconds": seconds, "gpu_seconds": seconds, "eager_seconds": eager}


def graph_scenarios(spec: ModelSpec, prefill: tuple[int, ...], decode: tuple[int, ...], context: int) -> list[dict]:
    """The scenarios of a gpu-calibrate recording, timed as CUDA-graph replays of the plain-torch step."""
    layers, shared = _weights(spec)
    scenarios = []
    for tokens in prefill:
        timing = _time(_Step(spec, layers, shared, 1, tokens, tokens))
        shape = StepShape((), ((tokens, 0),), 1)
        scenarios.append({"name": f"prefill n={tokens}", "steps": [_record(shape, timing)]})
        _print(f"prefill {tokens}", timing)
    for batch in decode:
        timing = _time(_Step(spec, layers, shared, batch, 1, context))
        shape = StepShape((context,) * batch, (), batch)
        scenarios.append({"name": f"decode b={batch} ctx~{context}", "steps": [_record(shape, timing)]})
        _print(f"decode b={batch}", timing)
    return scenarios


def _record(shape: StepShape, timing: dict) -> dict:
    return {"decode_contexts": list(shape.decode_contexts), "prefills": [list(p) for p in shape.prefills],
            "num_sampled": shape.num_sampled, **timing}


def _print(name: str, timing: dict) -> None:
    print(f"  {name}: graph {timing['seconds'] * 1e3:.2f} ms, eager {timing['eager_seconds'] * 1e3:.2f} ms", flush=True)
