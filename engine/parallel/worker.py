"""Ranks 1..N-1 of a tensor-parallel engine: mirror rank 0's KV layout, compute a shard of every step.

Started by deployments/cluster/tensor_parallel.py as one Ray actor per rank (or a thread in tests); the
loop blocks on rank 0's broadcasts (engine/parallel/group.py lists the message kinds) until STOP.
"""

from __future__ import annotations

import torch.distributed as dist

from engine.config import EngineConfig
from engine.core.runner import ModelRunner
from engine.device.rank import build_rank
from engine.parallel.group import READ_KV, STOP, TELEMETRY, WRITE_KV, join_group, object_device
from memory.kv.host_tier import HostChunkTier
from memory.kv.layered_migration import overlay_host_pages, write_host_pages
from memory.kv.mirror import LayoutMirror


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
        join_group(self.config, self.init_method_file, self.rank)
        state = build_rank(self.config, self.rank, self.config.tensor_parallel_size, all_reduce=dist.all_reduce)
        host_tier = None
        if self.config.kv_offload == "layerwise" and self.config.staging_mode == "in_place":
            host_tier = HostChunkTier(state.pool.backend, state.kv_spec.page_bytes,
                                      self.config.host_buffer_bytes // state.kv_spec.page_bytes)
        mirror = LayoutMirror(state.kv_spec, state.pool, state.dtype, state.host_buffer, layout=self.config.kv_layout,
                              host_tier=host_tier)
        runner = ModelRunner(state.model, mirror, state.workspace, sampler=None, kv_staging=self.config.staging_mode)
        page_tokens = state.kv_spec.tokens_per_page
        num_steps = 0
        try:
            while True:
                message = [None]
                dist.broadcast_object_list(message, src=0, device=object_device(self.config))
                kind, layout_log, payload = message[0]
                mirror.apply(layout_log)
                if kind == STOP:
                    return num_steps
                if kind == TELEMETRY:
                    dist.gather_object(state.pool.telemetry().to_dict(), None, dst=0)
                elif kind == READ_KV:
                    slot, start, end, host_pages = payload
                    layers = mirror.layout.read_tokens(slot, start, end)
                    overlay_host_pages(mirror.host_buffer, host_pages, layers, start, end, page_tokens)
                    dist.gather_object([(k.cpu(), v.cpu()) for k, v in layers], None, dst=0)
                elif kind == WRITE_KV:
                    share: list = [None]
                    dist.scatter_object_list(share, None, src=0)
                    slot, start, host_pages = payload
                    layers = write_host_pages(mirror.host_buffer, host_pages, share[0], start, page_tokens)
                    mirror.layout.write_tokens(slot, start, layers)
                else:
                    runner.forward_only(payload)
                    num_steps += 1
        finally:
            mirror.close()
            state.close()
            if dist.is_initialized():
                dist.destroy_process_group()
