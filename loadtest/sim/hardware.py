"""Devices the simulator knows (registry: `DEVICES`): the numbers the cost model and the memory budget use.

Peak numbers are the vendors' datasheet figures (dense bf16, no sparsity); the `*_efficiency` factors say
what share of a peak real kernels reach, and are estimates from public measurements, written next to each.
The `cpu-box` entry is this repository's CI box (2 cores, AVX512-BF16/AMX) running our own CPU engine on one
thread: its four constants are *fitted* to the step times recorded in loadtest/sim/calibration.json by
`python -m loadtest.sim calibrate --record` (see docs/SIMULATOR.md), not taken from a datasheet.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9
GIB = 1 << 30


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_bytes: int  # device memory (HBM)
    flops: float  # dense bf16 FLOP/s, peak
    hbm_bytes_per_s: float  # peak memory bandwidth
    pcie_bytes_per_s: float  # host link, one direction (swap, host KV)
    nvlink_bytes_per_s: float  # GPU-to-GPU in a node, one direction (0: none)
    network_bytes_per_s: float  # replica-to-replica across nodes (KV migration), one direction
    kernel_overhead_s: float  # per kernel launched (launch + tail), with CUDA graphs where decode uses them
    seq_overhead_s: float  # host work per sequence in a step (scheduling, sampling, detokenising)
    gemm_efficiency: float  # share of `flops` dense GEMMs reach
    attention_efficiency: float  # share of `flops` attention kernels reach (prefill, FlashAttention-2/3)
    memory_efficiency: float  # share of `hbm_bytes_per_s` streaming reads (weights, KV) reach
    kernels_per_layer: int = 8  # norm, qkv, rope+cache write, attention, o, norm, gate_up+act, down
    # GPU kernels overlap their compute with their memory traffic (roofline: the larger of the two counts);
    # our CPU engine's step times add up instead (measured: calibration.json fits a sum, not a max)
    overlap: bool = True
    pcie_efficiency: float = 1.0  # share of `pcie_bytes_per_s` pinned host <-> device copies reach

    def __post_init__(self) -> None:
        if min(self.memory_bytes, self.flops, self.hbm_bytes_per_s, self.network_bytes_per_s) <= 0:
            raise ValueError("memory, flops, bandwidths must be > 0")
        for name in ("gemm_efficiency", "attention_efficiency", "memory_efficiency", "pcie_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")


# Efficiencies shared by the NVIDIA entries (estimates):
# - GEMM 0.70: cuBLAS bf16 GEMMs at LLM shapes reach 65-75% of dense peak on A100/H100 (NVIDIA's
#   "Deep Learning Performance" GEMM guide; MLPerf inference submissions run at similar MFU).
# - attention 0.50: FlashAttention-2 reaches 50-70% of peak on A100 forward (Dao 2023, fig. 4), FA-3 ~75% on
#   H100 (Shah et al. 2024); vLLM's kernels sit lower, hence the round 0.5.
# - memory 0.80: decode GEMV/attention kernels stream weights and KV at ~80% of HBM peak (vLLM and
#   FlashInfer decode benchmarks report 70-90%).
# - kernel 4 us: a launch costs ~2-5 us (CUDA programming guide, "launch latency"); decode with CUDA graphs
#   pays less, prefill more; one figure for both.
# - seq overhead 20 us: vLLM's per-sequence scheduling + sampling on the host (vLLM v1 design notes give
#   ~tens of us per request per step before async scheduling).
# - network 25 GB/s: one 200 Gb/s InfiniBand/RoCE NIC per GPU, as Llumnix and Mell's KV migration assume.
# - PCIe 0.80: pinned cudaMemcpyAsync host <-> device reaches ~25 of 32 GB/s on Gen4 x16 and ~50-55 of 64 GB/s
#   on Gen5 x16 (NVIDIA's nvbandwidth / bandwidthTest figures; PCIe packet overhead takes the rest).
_NVIDIA = dict(kernel_overhead_s=4e-6, seq_overhead_s=20e-6, gemm_efficiency=0.70, attention_efficiency=0.50,
               memory_efficiency=0.80, network_bytes_per_s=25 * GB, pcie_efficiency=0.80)

DEVICES: dict[str, DeviceSpec] = {
    # A100 SXM4 80GB datasheet: 312 TFLOP/s bf16 dense, 2,039 GB/s HBM2e, PCIe Gen4 x16 (32 GB/s each way),
    # NVLink 3 600 GB/s total (300 each way).
    "a100-80g": DeviceSpec("a100-80g", 80 * GIB, 312e12, 2039 * GB, 32 * GB, 300 * GB, **_NVIDIA),
    # H100 SXM5 80GB datasheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, PCIe Gen5 x16 (64 GB/s each way),
    # NVLink 4 900 GB/s total (450 each way).
    "h100-80g": DeviceSpec("h100-80g", 80 * GIB, 989e12, 3350 * GB, 64 * GB, 450 * GB, **_NVIDIA),
    # H200 SXM 141GB datasheet: the H100's compute, 4.8 TB/s HBM3e, same links.
    "h200": DeviceSpec("h200", 141 * GB, 989e12, 4800 * GB, 64 * GB, 450 * GB, **_NVIDIA),
    # This box running engine/ on one torch thread (bf16 on AMX). FITTED by `python -m loadtest.sim calibrate
    # --record` to loadtest/sim/calibration.json (worst error 7.2%, median 2.7% over 17 scenarios): flops,
    # hbm_bytes_per_s (the rate the engine streams weights and KV from DRAM/cache), kernel_overhead_s (per op
    # of a layer) and seq_overhead_s (per sequence: sampling, Python bookkeeping). Efficiencies are 1 (the
    # fitted rates already are what the engine reaches); no overlap (the parts' times add up). 24 GiB of RAM.
    "cpu-box": DeviceSpec("cpu-box", 24 * GIB, 2.938e11, 4.768e9, 10 * GB, 0.0, 10 * GB,
                          kernel_overhead_s=4.91e-5, seq_overhead_s=7.12e-4, gemm_efficiency=1.0,
                          attention_efficiency=1.0, memory_efficiency=1.0, overlap=False),
}

ALIASES = {"a100": "a100-80g", "h100": "h100-80g", "h200-141g": "h200", "cpu": "cpu-box"}


def get_device(name: str) -> DeviceSpec:
    try:
        return DEVICES[ALIASES.get(name, name)]
    except KeyError:
        raise ValueError(f"unknown device {name!r}; known: {sorted(DEVICES)} (aliases {sorted(ALIASES)})") from None
