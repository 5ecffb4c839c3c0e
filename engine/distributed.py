"""Tensor parallelism: rank 0 plans, every rank computes its shard.

Rank 0 (the replica's engine) runs the scheduler and the KV bookkeeping. Before each step it
broadcasts one message — the KV layout calls made since the last step and the step's plan — and
every rank replays the layout calls on its own pool (`LayoutMirror`), builds the same batch and runs
its shard of the model; two all-reduces per layer sum the partial outputs. Only rank 0 samples.
Between steps rank 0 may also gather every rank's copy of a slot's KV, or scatter KV to the ranks (live
migration: engine/migration.py), and gather pool telemetry.
Each whole step (broadcast, compute, all-reduces) runs on the engine thread, never split across
awaits, so a cancelled request can never leave the ranks out of step.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.rank import build_rank
from engine.runner import ModelRunner
from engine.scheduler import SchedulerOutput
from memory.kv.mirror import LayoutMirror

logger = logging.getLogger(__name__)

STEP, STOP, TELEMETRY, READ_KV, WRITE_KV = "step", "stop", "telemetry", "read_kv", "write_kv"
KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


def _process_group_backend(config: EngineConfig) -> str:
    return "nccl" if config.device == "cuda" else "gloo"


def _join(config: EngineConfig, init_method_file: str, rank: int) -> None:
    if config.device == "cpu":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one node: stay on loopback
    else:
        torch.cuda.set_device(0)  # Ray gives each rank actor its own visible GPU
    dist.init_process_group(_process_group_backend(config), init_method=f"file://{init_method_file}",
                            rank=rank, world_size=config.tensor_parallel_size)


def _object_device(config: EngineConfig) -> torch.device | None:
    return torch.device("cuda") if config.device == "cuda" else None


class TensorParallelExecutor:
    """Rank 0's end of the process group: broadcasts layout calls and plans, sums partial outputs."""

    def __init__(self, config: EngineConfig, init_method_file: str):
        if config.tensor_parallel_size < 2:
            raise ValueError("a TensorParallelExecutor needs tensor_parallel_size >= 2")
        self.config = config
        self.init_method_file = init_method_file
        self.layout_log: list[tuple] = []  # filled by rank 0's KV manager (RecordingLayout)
        self.is_started = False

    def start(self) -> None:
        _join(self.config, self.init_method_file, rank=0)
        self.is_started = True

    def all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def _broadcast(self, kind: str, payload: SchedulerOutput | tuple | None) -> None:
        message = [(kind, list(self.layout_log), payload)]
        self.layout_log.clear()
        dist.broadcast_object_list(message, src=0, device=_object_device(self.config))

    def broadcast_step(self, plan: SchedulerOutput) -> None:
        self._broadcast(STEP, plan)

    def gather_telemetry(self, local: dict) -> list[dict]:
        """Every rank's pool telemetry, rank order (a collective: called between steps)."""
        self._broadcast(TELEMETRY, None)
        gathered: list = [None] * self.config.tensor_parallel_size
        dist.gather_object(local, gathered, dst=0)
        return gathered

    def read_kv(self, slot: int, start: int, end: int, local: KVLayers) -> list[KVLayers]:
        """Every rank's copy (its own heads) of tokens [start, end) of `slot`, rank order; rank 0's is `local`."""
        self._broadcast(READ_KV, (slot, start, end))
        gathered: list = [None] * self.config.tensor_parallel_size
        dist.gather_object(local, gathered, dst=0)
        return gathered

    def write_kv(self, slot: int, start: int, per_rank: list[KVLayers]) -> KVLayers:
        """Sends each rank its heads' share of KV for `slot` from token `start` (the layout calls made so far,
        e.g. the reservation's pages, travel first); returns rank 0's share."""
        self._broadcast(WRITE_KV, (slot, start))
        mine: list = [None]
        dist.scatter_object_list(mine, per_rank, src=0)
        return mine[0]

    def stop(self) -> None:
        """Tells the workers to leave their loop, then leaves the process group."""
        if not self.is_started:
            return
        self._broadcast(STOP, None)
        dist.destroy_process_group()
        self.is_started = False


def create_executor(config: EngineConfig, init_method_file: str) -> TensorParallelExecutor:
    return TensorParallelExecutor(config, init_method_file)


class WorkerProcess:
    """Ranks 1..N-1: a blocking loop that mirrors rank 0's KV layout and computes its shard."""

    def __init__(self, rank: int, world_size: int, init_method_file: str, config: EngineConfig):
        if world_size != config.tensor_parallel_size or not 0 < rank < world_size:
            raise ValueError(f"bad rank {rank} for world size {world_size}")
        self.rank = rank
        self.config = config
        self.init_method_file = init_method_file

    def run(self) -> int:
        """Serves steps until rank 0 says stop; returns the number of steps run."""
        _join(self.config, self.init_method_file, self.rank)
        state = build_rank(self.config, self.rank, self.config.tensor_parallel_size, all_reduce=dist.all_reduce)
        mirror = LayoutMirror(state.kv_spec, state.pool, state.dtype, state.host_buffer)
        runner = ModelRunner(state.model, mirror, state.workspace, sampler=None)
        num_steps = 0
        try:
            while True:
                message = [None]
                dist.broadcast_object_list(message, src=0, device=_object_device(self.config))
                kind, layout_log, payload = message[0]
                mirror.apply(layout_log)
                if kind == STOP:
                    return num_steps
                if kind == TELEMETRY:
                    dist.gather_object(state.pool.telemetry().to_dict(), None, dst=0)
                elif kind == READ_KV:
                    slot, start, end = payload
                    layers = [(k.cpu(), v.cpu()) for k, v in mirror.layout.read_tokens(slot, start, end)]
                    dist.gather_object(layers, None, dst=0)
                elif kind == WRITE_KV:
                    share: list = [None]
                    dist.scatter_object_list(share, None, src=0)
                    mirror.layout.write_tokens(payload[0], payload[1], share[0])
                else:
                    runner.forward_only(payload)
                    num_steps += 1
        finally:
            mirror.close()
            state.close()
            if dist.is_initialized():
                dist.destroy_process_group()
