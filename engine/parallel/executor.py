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

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.core.scheduler import SchedulerOutput
from engine.parallel.group import READ_KV, STEP, STOP, TELEMETRY, WRITE_KV, KVLayers, join_group, object_device

logger = logging.getLogger(__name__)


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
        join_group(self.config, self.init_method_file, rank=0)
        self.is_started = True

    def all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def _broadcast(self, kind: str, payload: SchedulerOutput | tuple | None) -> None:
        message = [(kind, list(self.layout_log), payload)]
        self.layout_log.clear()
        dist.broadcast_object_list(message, src=0, device=object_device(self.config))

    def broadcast_step(self, plan: SchedulerOutput, staging: list | None = None) -> None:
        """Sends the step's plan; `staging` (LayerKV: the host pages each layer stages) rides the layout log."""
        if staging is not None:
            self.layout_log.append(("stage", staging))
        self._broadcast(STEP, plan)

    def gather_telemetry(self, local: dict) -> list[dict]:
        """Every rank's pool telemetry, rank order (a collective: called between steps)."""
        self._broadcast(TELEMETRY, None)
        gathered: list = [None] * self.config.tensor_parallel_size
        dist.gather_object(local, gathered, dst=0)
        return gathered

    def read_kv(self, slot: int, start: int, end: int, local: KVLayers,
                host_pages: dict | None = None) -> list[KVLayers]:
        """Every rank's copy (its own heads) of tokens [start, end) of `slot`, rank order; rank 0's is `local`.
        `host_pages` ((layer, page) -> host slots, LayerKV): pages each rank reads from its host buffer."""
        self._broadcast(READ_KV, (slot, start, end, host_pages or {}))
        gathered: list = [None] * self.config.tensor_parallel_size
        dist.gather_object(local, gathered, dst=0)
        return gathered

    def write_kv(self, slot: int, start: int, per_rank: list[KVLayers], host_pages: dict | None = None) -> KVLayers:
        """Sends each rank its heads' share of KV for `slot` from token `start` (the layout calls made so far,
        e.g. the reservation's pages, travel first); returns rank 0's share. `host_pages` as in `read_kv`:
        those pages' tokens go into each rank's host buffer."""
        self._broadcast(WRITE_KV, (slot, start, host_pages or {}))
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
