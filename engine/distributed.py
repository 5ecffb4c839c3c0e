"""Tensor parallelism: rank 0 plans, every rank computes its shard.

Rank 0 (the replica's engine) runs the scheduler and the KV bookkeeping. Before each step it
broadcasts one message — the KV layout calls made since the last step and the step's plan — and
every rank replays the layout calls on its own pool (`LayoutMirror`), builds the same batch and runs
its shard of the model; two all-reduces per layer sum the partial outputs. Only rank 0 samples.
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

STEP, STOP, TELEMETRY = "step", "stop", "telemetry"


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

    def _broadcast(self, kind: str, plan: SchedulerOutput | None) -> None:
        message = [(kind, list(self.layout_log), plan)]
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
                kind, layout_log, plan = message[0]
                mirror.apply(layout_log)
                if kind == STOP:
                    return num_steps
                if kind == TELEMETRY:
                    dist.gather_object(state.pool.telemetry().to_dict(), None, dst=0)
                    continue
                runner.forward_only(plan)
                num_steps += 1
        finally:
            mirror.close()
            state.close()
            if dist.is_initialized():
                dist.destroy_process_group()
