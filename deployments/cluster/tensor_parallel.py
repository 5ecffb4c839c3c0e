"""Ranks 1..N-1 of a tensor-parallel replica: one Ray actor each, in the replica's placement group.

The replica itself is rank 0 (bundle 0); rank r runs in bundle r (STRICT_PACK keeps them on one node, even on
a multi-node cluster, so `torch.distributed` can rendezvous through a file and the group stays on the loopback
interface: `EngineConfig.process_group_interface`, set by deployments/server.py from cluster/placement.py).
Each actor hosts the engine's `WorkerProcess(rank, world_size, init_method_file, engine_config)` and calls its blocking
`run()` loop, which returns when rank 0 broadcasts a stop during engine shutdown.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

logger = logging.getLogger(__name__)

WORKER_PATH = "engine.parallel.worker:WorkerProcess"
EXECUTOR_PATH = "engine.parallel.executor:create_executor"


def import_attr(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class _RankWorker:
    """Hosts one rank; `max_concurrency=2` lets `ping` answer while `run` blocks."""

    def __init__(self, worker_path: str, rank: int, world_size: int, init_method_file: str, engine_config):
        self._worker = import_attr(worker_path)(rank, world_size, init_method_file, engine_config)

    def run(self) -> None:
        return self._worker.run()

    def ping(self) -> str:
        return "ok"

    def describe(self) -> dict[str, Any]:
        context = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": context.get_node_id(),
                "placement_group_id": context.get_placement_group_id(),
                "resources": context.get_assigned_resources()}


class WorkerLauncher:
    def __init__(self, world_size: int, engine_config: Any, cpus_per_rank: float, gpus_per_rank: float = 0,
                 worker_path: str = WORKER_PATH):
        if world_size < 2:
            raise ValueError("a WorkerLauncher is for tensor_parallel_size >= 2")
        self.world_size = world_size
        self._engine_config = engine_config
        self._cpus_per_rank = cpus_per_rank
        self._gpus_per_rank = gpus_per_rank
        self._worker_path = worker_path
        self._directory = tempfile.mkdtemp(prefix="elastic-serve-tp-")
        # The file must not exist before the ranks meet: torch.distributed creates it.
        self.init_method_file = os.path.join(self._directory, "rendezvous")
        self._actors: list[ray.actor.ActorHandle] = []
        self._runs: list[ray.ObjectRef] = []

    def start(self) -> None:
        """Starts ranks 1..N-1 without waiting for them: they block in the rendezvous until rank 0 joins."""
        group = ray.util.get_current_placement_group()
        if group is None:
            raise RuntimeError("tensor_parallel_size > 1 needs the replica's placement group "
                               "(placement_group_bundles with one bundle per rank)")
        worker_cls = ray.remote(_RankWorker)
        for rank in range(1, self.world_size):
            strategy = PlacementGroupSchedulingStrategy(placement_group=group,
                                                        placement_group_bundle_index=rank)
            options = {"num_cpus": self._cpus_per_rank, "num_gpus": self._gpus_per_rank, "max_concurrency": 2,
                       "scheduling_strategy": strategy}
            actor = worker_cls.options(**options).remote(
                self._worker_path, rank, self.world_size, self.init_method_file, self._engine_config)
            self._actors.append(actor)
            self._runs.append(actor.run.remote())

    def describe_workers(self, timeout_s: float = 30.0) -> list[dict[str, Any]]:
        """Where ranks 1..N-1 run. Waits for their constructors, so call it only once rank 0 has joined
        (a real rank blocks in its constructor until the rendezvous completes)."""
        return ray.get([actor.describe.remote() for actor in self._actors], timeout=timeout_s)

    def failed_ranks(self) -> list[int]:
        """Ranks whose run loop has already ended (it should only end at shutdown)."""
        done, _ = ray.wait(self._runs, num_returns=len(self._runs), timeout=0)
        return [index + 1 for index, ref in enumerate(self._runs) if ref in done]

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """After the engine broadcast its stop: wait for the run loops, then kill the actors."""
        if self._runs:
            ray.wait(self._runs, num_returns=len(self._runs), timeout=timeout_s)
        for actor in self._actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                logger.debug("TP worker already gone", exc_info=True)
        self._actors.clear()
        self._runs.clear()
        shutil.rmtree(self._directory, ignore_errors=True)
