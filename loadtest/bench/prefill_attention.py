"""Prefill attention side by side: a native prefill kernel (bf16: engine/attention/csrc/prefill_attention.c;
fp32: prefill_attention_f32.c) against scaled_dot_product_attention per chunk, in one process, alternating.

1. One layer's attention for `--prompts` chunks of `--prompt-len` tokens (SmolLM2's heads by default), SDPA
   and the kernel (bf16: on vdpbf16ps, and on AMX tiles where the CPU has them) on the same tensors, median of
   `--repeats`.
2. Whole engine prefill steps of those prompts (`--dtype`, `--threads`), the kernel on and off (the backend's
   kernels emptied: SDPA per chunk) alternating step by step, median per path.

    python -m loadtest.bench.prefill_attention [--dtype bfloat16|float32] [--prompts 16] [--prompt-len 128]

bf16 needs an AVX512-BF16 CPU, fp32 AVX2/FMA (elsewhere prompts use SDPA). On a shared box run it with
OMP_WAIT_POLICY=PASSIVE and quote the load average it prints.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from engine.api import GenerateRequest
from engine.attention import native
from engine.attention.base import LayerAttentionSpec
from engine.attention.torch_sdpa import TorchSdpaBackend
from engine.config import EngineConfig
from engine.core.engine import LLMEngine
from engine.core.forward_batch import ForwardBatch, PrefillChunk
from engine.sampling_params import SamplingParams


def _median_ms(function, repeats: int) -> float:
    function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def layer(args, kernels) -> None:
    prompts, length, dtype = args.prompts, args.prompt_len, getattr(torch, args.dtype)
    spec = LayerAttentionSpec(9, 3, 64, None)
    keys, values = (torch.randn(prompts, length, 3, 64).to(dtype) for _ in "kv")
    query = torch.randn(prompts * length, 9, 64).to(dtype)
    out = torch.empty_like(query)
    chunks = tuple(PrefillChunk(i, 0, length, i * length) for i in range(prompts))
    batch = ForwardBatch(
        input_ids=torch.zeros(prompts * length, dtype=torch.long), positions=torch.arange(length).repeat(prompts),
        token_slots=torch.arange(prompts).repeat_interleave(length), num_decode_tokens=0,
        decode_slots=torch.zeros(0, dtype=torch.long), decode_context_lens=torch.zeros(0, dtype=torch.long),
        decode_slots_are_prefix=True, max_decode_context_len=0, prefills=chunks, logits_indices=torch.arange(prompts))
    # bf16: the kernel's products on vdpbf16ps and, where the CPU has AMX, on tiles
    bf16 = dtype == torch.bfloat16
    routines = ["vector"] + (["tiles"] if bf16 and native.set_prefill_tiles(True) else [])
    times: dict[str, list[float]] = {name: [] for name in ["SDPA", *routines]}
    for _ in range(3):
        times["SDPA"].append(_median_ms(lambda: TorchSdpaBackend()._prefills(spec, query, keys, values, batch, out),
                                        args.repeats))
        for name in routines:
            if bf16:
                native.set_prefill_tiles(name == "tiles")
            times[name].append(_median_ms(
                lambda: native.prefill_in_place(kernels, spec, query, keys, values, None, batch, out), args.repeats))
    if bf16:
        native.set_prefill_tiles(native.amx_tiles_allowed())
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"one layer, {prompts} x {length} tokens, 9/3 heads of 64, {args.dtype}: "
          + ", ".join(f"{name} {ms:.2f} ms" for name, ms in medians.items()) + "; SDPA's time / the kernel's: "
          + ", ".join(f"{name} {medians['SDPA'] / medians[name]:.2f}x" for name in routines))


def steps(args) -> None:
    engine = LLMEngine(EngineConfig(dtype=args.dtype, num_threads=args.threads, enable_prefix_caching=False,
                                    max_num_batched_tokens=max(512, args.prompts * args.prompt_len)))
    try:
        backend = engine.runner.model.attention
        kernels, vocab = backend._prefill_kernels, engine.runner.model.config.vocab_size
        times: dict[str, list[float]] = {"kernel": [], "sdpa": []}
        params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        for index in range(2 * (args.steps + 1)):
            name = "kernel" if index % 2 == 0 else "sdpa"
            backend._prefill_kernels = kernels if name == "kernel" else {}
            for i in range(args.prompts):  # distinct prompts, nothing cached
                prompt = tuple((1000 + 7 * i + 13 * t + 101 * index) % vocab for t in range(args.prompt_len))
                engine.add_request(GenerateRequest(f"s{index}-{i}", prompt, params))
            start = time.perf_counter()
            engine.step()
            if index >= 2:
                times[name].append(time.perf_counter() - start)
            while engine.has_work:
                engine.step()
        kernel_ms, sdpa_ms = (statistics.median(times[n]) * 1e3 for n in ("kernel", "sdpa"))
        print(f"prefill step, {args.prompts} x {args.prompt_len} tokens, {args.dtype}, {args.threads} threads: SDPA "
              f"{sdpa_ms:.0f} ms, kernel {kernel_ms:.0f} ms, {sdpa_ms / kernel_ms:.2f}x (median of {args.steps} each)")
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20, help="layer timings per path and round")
    parser.add_argument("--steps", type=int, default=4, help="prefill steps per path")
    args = parser.parse_args()
    kernels = native.load_prefill_kernels()
    if getattr(torch, args.dtype) not in kernels:
        raise SystemExit(f"no {args.dtype} prefill kernel on this CPU (bf16 needs AVX512-BF16, fp32 AVX2/FMA): "
                         "prompts use SDPA here")
    torch.set_num_threads(args.threads)
    print(f"load average {os.getloadavg()[0]:.2f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    layer(args, kernels)
    steps(args)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
