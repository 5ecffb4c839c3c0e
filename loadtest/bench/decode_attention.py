"""The native decode-attention kernel (engine/attention/csrc/decode_attention.c) per layer: time and the K/V
bytes it reads per second, for batches of sequences of one context length over a contiguous bf16 (or fp32)
cache with SmolLM2's heads (9 query heads, 3 key/value heads of 64), median of `--repeats` calls.

    python -m loadtest.bench.decode_attention [--batches 16 64] [--context 140 512] [--threads 1 2]

The fused decode step (engine/model/decode_step.py) runs the same per-sequence routine
(csrc/decode_attention_bf16.h), so this is the attention share of a decode step. Compare commits by running
it at each; on a shared box run it with OMP_WAIT_POLICY=PASSIVE and quote the load average it prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from engine.attention import native
from engine.attention.base import LayerAttentionSpec

SPEC = LayerAttentionSpec(num_heads=9, num_kv_heads=3, head_dim=64, sliding_window=None)


def time_layer(library, batch: int, context: int, dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of one layer's decode attention: `batch` sequences of `context` tokens each."""
    generator = torch.Generator().manual_seed(batch * 1000 + context)
    shape = (batch, context + 16, SPEC.num_kv_heads, SPEC.head_dim)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    q = torch.randn(batch, SPEC.num_heads, SPEC.head_dim, generator=generator).to(dtype)
    out = torch.empty_like(q)
    slots, lens = torch.arange(batch), torch.full((batch,), context)
    times = []
    for index in range(repeats + 3):
        started = time.perf_counter()
        native.decode_in_place(library, SPEC, q, key_cache, value_cache, None, slots, lens, out)
        if index >= 3:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--context", type=int, nargs="+", default=[140, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    library = native.load_decode_kernels()
    print(f"load average {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
          f"{args.dtype}, heads 9/3 of 64")
    print("| batch | context | threads | us per layer | K/V GB/s |")
    print("|---|---|---|---|---|")
    row_bytes = 2 * SPEC.num_kv_heads * SPEC.head_dim * torch.finfo(dtype).bits // 8
    for batch in args.batches:
        for context in args.context:
            for threads in args.threads:
                torch.set_num_threads(threads)
                seconds = time_layer(library, batch, context, dtype, args.repeats)
                print(f"| {batch} | {context} | {threads} | {seconds * 1e6:.0f} | "
                      f"{batch * context * row_bytes / seconds / 1e9:.1f} |")
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
