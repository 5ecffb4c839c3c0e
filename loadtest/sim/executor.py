"""The cost-model executor: what stands in for the ModelRunner in a simulated replica.

It has the ModelRunner's interface as the scheduler and the engine's step loop use it
(`activation_chunks`, `activation_chunks_charged_to_kv`, `run(plan, states) -> SampleResult`): the
activation workspace is the engine's own `ActivationWorkspace` on the `sim` backend, sized by the engine's
own buffer plan (`LlamaModel.plan_buffers`), inflated before each step and left for KV to reclaim after it,
exactly as on a device. Instead of running a model it says how long the step took (`step_s`, from
cost.py) and "samples" token 0 for every row (simulated requests ignore EOS and stop at max_tokens).

With layer-wise KV offloading (LayerKV) the step also runs the engine's own `LayerStager` over the real
staging plan (`step_stager`, as the ModelRunner builds it): its staging chunks are taken from the pool for
the step (the `activations` balloon) and given back, exactly as on a device; the bytes it fetches from and
writes back to the host, per layer, go into the step's cost (cost.py: the copy engine runs one layer ahead
of compute).

`BookkeepingLayout` is a KV layout that maps nothing in virtual memory: the manager decides exactly as with
the engine's `contiguous` layout (slots, pages, chunks), without one VMM call per chunk (tested).
`PagedBookkeepingLayout` does the same for the `paged` layout: blocks are small pages of the LCM allocator.
`BookkeepingHostBuffer` is the host buffer's slot bookkeeping without bytes (offloaded layers' pages).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from engine.core.layer_staging import InlineCopies, LayerStager, step_stager
from engine.core.sampler import SampleResult
from engine.core.sampling_workspace import SampledRows
from engine.core.scheduler import SchedulerOutput
from engine.device.activation_workspace import ActivationWorkspace
from engine.model.config import ModelConfig
from engine.model.llama import LlamaModel, ShardPlan
from loadtest.sim.cost import CostModel, StepShape
from memory.host_buffer import HostSlots
from memory.kv import KVCacheManager, KVCacheSpec
from memory.kv.layout import KVLayers, KVLayout


def step_shape(plan: SchedulerOutput, staged: tuple[tuple[int, int], ...] = ()) -> StepShape:
    return StepShape(tuple(chunk.start + 1 for chunk in plan.decodes),
                     tuple((len(chunk.token_ids), chunk.start) for chunk in plan.prefills),
                     len(plan.decodes) + sum(chunk.samples for chunk in plan.prefills), staged)


def staged_bytes(stager: LayerStager, page_bytes: int) -> tuple[tuple[int, int], ...]:
    """Per layer: (bytes fetched from the host before it runs, bytes written back after: the rows the step
    wrote), K and V."""
    return tuple((2 * page_bytes * sum(copy.fetch for copy in layer),
                  2 * stager.row_bytes * sum(copy.rows[1] - copy.rows[0] for copy in layer)) for layer in stager.plan)


class SimExecutor:
    def __init__(self, config: ModelConfig, dtype: torch.dtype, workspace: ActivationWorkspace, cost: CostModel,
                 kv: KVCacheManager | None = None):
        self.workspace = workspace
        self.cost = cost
        self.kv = kv
        self.last_staged: tuple[tuple[int, int], ...] = ()  # the last step's staged bytes per layer
        self.bytes_fetched = 0  # host -> device bytes staged over the run
        self.bytes_written_back = 0  # device -> host bytes the staged layers' new tokens took back
        shard = ShardPlan.for_rank(config, 0, 1)
        self._activation_bytes = lru_cache(maxsize=4096)(
            lambda num_tokens, num_sampled: LlamaModel.plan_buffers(config, shard, dtype, num_tokens,
                                                                    num_sampled).num_bytes)

    def activation_chunks(self, num_tokens: int, rows: SampledRows) -> int:
        """The model's buffers for the step (the simulator does not model the sampler's temporaries:
        its requests sample nothing)."""
        if num_tokens == 0:
            return 0
        return self.workspace.num_pages_for(self._activation_bytes(num_tokens, max(rows.num_rows, 1)))

    def activation_chunks_charged_to_kv(self, num_tokens: int, rows: SampledRows) -> int:
        return self.workspace.pages_charged_to_kv(self.activation_chunks(num_tokens, rows))

    def run(self, plan: SchedulerOutput, states: Sequence[object]) -> SampleResult:
        """The step's memory effect (its workspace balloons up, offloaded layers are staged layer by layer,
        then both may be reclaimed); token 0 per row."""
        shape = step_shape(plan)
        self.workspace.acquire(self._activation_bytes(shape.num_tokens, max(shape.num_sampled, 1)))
        try:
            self.last_staged = self._stage(plan)
        finally:
            self.workspace.release()
        return SampleResult([0] * shape.num_sampled, [None] * shape.num_sampled)

    def _stage(self, plan: SchedulerOutput) -> tuple[tuple[int, int], ...]:
        stager = step_stager(self.kv, plan, InlineCopies(), self.workspace.give_back) if self.kv else None
        if stager is None:
            return ()
        try:
            for layer in range(len(stager.plan)):
                stager.before(layer)
                stager.after(layer)
        finally:
            stager.close()
        self.bytes_fetched += stager.bytes_fetched
        self.bytes_written_back += stager.bytes_written_back
        return staged_bytes(stager, self.kv.spec.page_bytes)

    def step_s(self, plan: SchedulerOutput) -> float:
        """The time of `plan`, the step `run` ran last (its staged bytes count)."""
        return self.cost.step_s(step_shape(plan, self.last_staged))

    def decode_steps_s(self, contexts: Sequence[int], num_steps: int) -> np.ndarray:
        """Times of `num_steps` decode-only steps of the same batch (fast-forward)."""
        return self.cost.decode_steps_s(contexts, num_steps)


class BookkeepingLayout(KVLayout):
    """A KV layout that places nothing in virtual memory (see the module doc). It holds no bytes: placing
    and copying pages does nothing, and there are no tensors to read. loadtest/sim/replica.py registers it
    (`register_layout`) before it builds a replica's KV manager."""

    name = "bookkeeping"

    def __init__(self, spec: KVCacheSpec, backend: object, dtype: torch.dtype) -> None:
        self.spec = spec
        self.held_layers = frozenset(range(spec.num_layers))
        self._layer_pages: dict[tuple[int, int, int], tuple] = {}  # (layer, slot, page) -> K, V chunks

    def layer_caches(self) -> list[tuple]:
        raise NotImplementedError("the bookkeeping layout has no tensors")

    def map_block(self, slot: int, page: int, block: object) -> None:
        pass

    def unmap_block(self, slot: int, page: int, block: object) -> None:
        pass

    def move_block(self, block: object, src_slot: int, dst_slot: int, page: int) -> None:
        pass

    def block_pages(self, slot: int, page: int, block: object) -> list:
        raise NotImplementedError("the bookkeeping layout holds no KV data")

    def copy_block_to_host(self, slot: int, page: int, block: object, host_buffer: object,
                           host_slots: list[int]) -> None:
        pass

    def copy_block_from_host(self, slot: int, page: int, block: object, host_buffer: object,
                             host_slots: list[int]) -> None:
        pass

    def block_freed(self, block: object) -> None:
        pass

    # one layer's page (layer-wise residency and staging): chunks are remembered, never mapped
    def map_layer_page(self, layer: int, slot: int, page: int, key_chunk: object, value_chunk: object) -> None:
        self._layer_pages[(layer, slot, page)] = (key_chunk, value_chunk)

    def unmap_layer_page(self, layer: int, slot: int, page: int) -> tuple:
        return self._layer_pages.pop((layer, slot, page), (None, None))

    def layer_page_views(self, layer: int, slot: int, page: int) -> tuple[None, None]:
        return None, None  # no bytes: the host buffer's copies of them do nothing

    def read_tokens(self, slot: int, start: int, end: int) -> KVLayers:
        raise NotImplementedError("the bookkeeping layout holds no KV data")

    def write_tokens(self, slot: int, start: int, layers: KVLayers) -> None:
        pass  # no bytes: KV carried into these pages (KunServe's pair forming, restoring) places nothing

    def close(self) -> None:
        pass


class PagedBookkeepingLayout(BookkeepingLayout):
    """The `paged` layout's decisions without placing anything: its blocks are small pages of Jenga's LCM
    allocator (the KV manager takes them through `LcmBlocks` from a KVBalloon), as `paged` blocks are."""

    name = "bookkeeping-paged"
    small_pages = True


class BookkeepingHostBuffer(HostSlots):
    """The host buffer's slots without host memory: pages offloaded, swapped or staged are allocated and
    freed as in the engine's HostBuffer, and their copies move nothing."""

    is_pinned = False

    def copy_in(self, slot: int, src: object) -> None:
        self._check_allocated(slot)

    def copy_in_bytes(self, slot: int, src: object, start: int, end: int) -> None:
        self._check_allocated(slot)

    def copy_out(self, slot: int, dst: object) -> None:
        self._check_allocated(slot)

    def view(self, slot: int) -> torch.Tensor:
        raise NotImplementedError("the bookkeeping host buffer holds no KV data")
