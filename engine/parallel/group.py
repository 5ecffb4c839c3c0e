"""How the ranks of one tensor-parallel engine meet and what rank 0 sends them.

Rank 0 broadcasts one message per step or request: (kind, layout log, payload), where kind is one of the
constants below. Both sides (executor.py on rank 0, worker.py on ranks 1..N-1) use these helpers.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from engine.config import EngineConfig

STEP, STOP, TELEMETRY, READ_KV, WRITE_KV = "step", "stop", "telemetry", "read_kv", "write_kv"
KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


def process_group_backend(config: EngineConfig) -> str:
    return "nccl" if config.device == "cuda" else "gloo"


def join_group(config: EngineConfig, init_method_file: str, rank: int) -> None:
    if config.process_group_interface is not None:
        variable = "GLOO_SOCKET_IFNAME" if config.device == "cpu" else "NCCL_SOCKET_IFNAME"
        os.environ[variable] = config.process_group_interface
    if config.device == "cuda":
        torch.cuda.set_device(0)  # Ray gives each rank actor its own visible GPU
    dist.init_process_group(process_group_backend(config), init_method=f"file://{init_method_file}",
                            rank=rank, world_size=config.tensor_parallel_size)


def object_device(config: EngineConfig) -> torch.device | None:
    return torch.device("cuda") if config.device == "cuda" else None
