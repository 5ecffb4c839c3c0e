"""KunServe's cooperative pair in the simulator: two replicas of one model that dropped complementary layers
serve every request of both as one two-stage pipeline, then restore.

The bookkeeping is the engine's (engine/cooperative/pair.py's `CooperativePair.drop` / `restore`, step by
step, without bytes): the requests of both replicas are taken with `Scheduler.take_all_for_recompute`,
each running one keeps its KV or recomputes it as the engine's `CarryPolicy` decides (KV bytes over the
pair's link vs the scheduler's own `StepCostModel`) and is placed with `carry.place`; each replica drops its
layers' weight chunks (`SimEngine.drop_layers`: the pool's `weights` balloon deflates, KV may take the
chunks in the very next step) and its KV manager keeps only its stage's layers (`hold_layers`); the first
replica's scheduler plans for both with a `PipelineKV` over the two managers (admission on the tighter
stage). Restoring dissolves it the same way and inflates the weights again.

What is modelled (`PipelineExecutor`, the first replica's runner while dropped): a step is cut by the
engine's own `MicroBatchCut` (engine/cooperative/pipeline.py): up to `num_micro_batches` micro-batches of at
least `min_micro_batch_tokens` tokens (the engine's defaults: 2 and 64, so decode batches under 128 rows run
whole), or with `min_decode_rows` > 0 also by decode rows (bubble hiding for small decode batches); stage 1
(layers [0, split), on the first replica) and stage 2 (the rest + LM head + sampling, on the second) each
take the cost model's time for their layers (`CostModel(layers=..., head=...)`); a micro-batch's hidden
states (tokens x hidden x 2 B) cross the link (NVLink or PCIe) before stage 2 runs it; stage 1 runs
micro-batch i+1 while stage 2 runs i. Forming the pair stalls both replicas for the KV they exchange over
the link; restoring stalls each for its dropped weights over PCIe (the host copy) plus the KV coming back.
Stage 2's activation workspace is not simulated (the first replica's is charged for the whole step).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from deployments.cluster.drop_plan import DropOrder
from engine.cooperative.carry import CarriedKV, CarryPolicy, place, to_copy
from engine.cooperative.kv import PipelineKV
from engine.cooperative.pipeline import MicroBatchCut, grown_layers, pipeline_split
from engine.core.request import Request
from engine.core.sampling_workspace import SampledRows
from engine.core.scheduler import SchedulerOutput
from loadtest.sim.cost import CostModel
from loadtest.sim.executor import SimExecutor, step_shape
from loadtest.sim.replica import SimReplica


@dataclass(frozen=True)
class PipelineOptions:
    link: str = "nvlink"  # how hidden states and carried KV move between the pair: nvlink | pcie
    num_micro_batches: int = 2
    min_micro_batch_tokens: int = 64
    min_decode_rows: int = 0  # > 0: decode steps are cut too, into micro-batches of at least this many rows
    carry: str = "auto"  # CarryPolicy mode: auto | copy | recompute


def _pipeline_s(stage1: Sequence, stage2: Sequence, transfer: Sequence):
    """End of a two-stage pipeline over micro-batches (elementwise over numpy arrays of steps)."""
    end1 = end2 = 0.0
    for t1, t2, x in zip(stage1, stage2, transfer, strict=True):
        end1 = end1 + t1
        end2 = np.maximum(end2, end1 + x) + t2
    return end2


class PipelineExecutor:
    """The first replica's runner while its pair is dropped: activations as its own executor, time of the
    two-stage pipeline (module doc)."""

    def __init__(self, inner: SimExecutor, cost: CostModel, split: int, link_bytes_per_s: float,
                 options: PipelineOptions):
        model, device = cost.model, cost.device
        self.inner = inner
        self.stage1 = CostModel(model, device, range(0, split), head=False)
        self.stage2 = CostModel(model, device, range(split, model.num_layers), head=True)
        self.hidden_bytes = model.hidden_size * model.dtype_bytes
        self.link_bytes_per_s = link_bytes_per_s
        self.latency_s = 2 * device.kernel_overhead_s  # a send and a receive per micro-batch
        self.options = options
        self.cut = MicroBatchCut(options.num_micro_batches, options.min_micro_batch_tokens, options.min_decode_rows)
        self.busy_s = self.wall_s = 0.0  # both stages' busy time and the steps' time: the bubble ratio

    # the ModelRunner interface the scheduler and SimReplica use
    def activation_chunks(self, num_tokens: int, rows: SampledRows) -> int:
        return self.inner.activation_chunks(num_tokens, rows)

    def activation_chunks_charged_to_kv(self, num_tokens: int, rows: SampledRows) -> int:
        return self.inner.activation_chunks_charged_to_kv(num_tokens, rows)

    def run(self, plan: SchedulerOutput, states: Sequence[object]):
        return self.inner.run(plan, states)

    @property
    def last_staged(self) -> tuple[tuple[int, int], ...]:
        return self.inner.last_staged

    def _transfer_s(self, num_tokens):
        return np.asarray(num_tokens) * self.hidden_bytes / self.link_bytes_per_s + self.latency_s

    def step_s(self, plan: SchedulerOutput) -> float:
        parts = [step_shape(micro) for micro in self.cut.cut(plan)]  # the engine's cut
        t1 = [self.stage1.step_s(part) for part in parts]
        t2 = [self.stage2.step_s(part) for part in parts]
        wall = float(_pipeline_s(t1, t2, [self._transfer_s(part.num_tokens) for part in parts]))
        self._account(sum(t1) + sum(t2), wall)
        return wall

    def decode_steps_s(self, contexts: Sequence[int], num_steps: int) -> np.ndarray:
        parts, start = [], 0
        for rows in self.cut.decode_rows(len(contexts)):  # the engine's cut of a decode step
            parts.append(list(contexts[start:start + rows]))
            start += rows
        t1 = [self.stage1.decode_steps_s(part, num_steps) for part in parts]
        t2 = [self.stage2.decode_steps_s(part, num_steps) for part in parts]
        wall = _pipeline_s(t1, t2, [self._transfer_s(len(part)) for part in parts])
        wall = np.broadcast_to(wall, (num_steps,)).astype(np.float64)
        self._account(float(sum(np.sum(t) for t in t1 + t2)), float(wall.sum()))
        return wall

    def _account(self, busy: float, wall: float) -> None:
        self.busy_s += busy
        self.wall_s += wall

    @property
    def bubble_ratio(self) -> float:
        return 1 - self.busy_s / (2 * self.wall_s) if self.wall_s else 0.0


class SimPair:
    """Two replicas of one model as KunServe's pair, formed by `drop` and dissolved by `restore`."""

    def __init__(self, first: SimReplica, second: SimReplica, order: DropOrder, options: PipelineOptions):
        engine = first.engine
        self.first, self.second, self.order, self.options = first, second, order, options
        self.num_layers = num_layers = engine.model.num_layers
        self.split = pipeline_split(num_layers, order.first_keeps, order.second_from)
        device = engine.device
        self.link_bytes_per_s = device.nvlink_bytes_per_s if options.link == "nvlink" else device.pcie_bytes_per_s
        self.carry = CarryPolicy(options.carry, self.link_bytes_per_s)
        self.homes: dict[str, SimReplica] = {}
        self.runner: PipelineExecutor | None = None
        self._saved = None
        self.num_carried = self.num_recomputed = 0
        self.layer_kv_bytes = engine.model.kv_bytes_per_token_layer

    def _exchange(self, moves: Sequence[tuple[Request, int]], scheduler) -> tuple[dict[str, CarriedKV], float]:
        """CarryPolicy's choice for each (running request, layers whose KV changes replica); the link time of
        the KV that moves."""
        layers = {request.request_id: num_layers for request, num_layers in moves}
        chosen = to_copy(self.carry, moves, self.layer_kv_bytes, scheduler.cost_model)
        moved = sum(tokens * layers[request_id] * self.layer_kv_bytes for request_id, tokens in chosen.items())
        carried = {request_id: CarriedKV(tokens, []) for request_id, tokens in chosen.items()}
        return carried, moved / self.link_bytes_per_s

    def drop(self, now: float) -> int:
        """Forms the pipeline at `now` (both replicas between steps); returns the weight chunks freed."""
        first, second, order, split = self.first.engine, self.second.engine, self.order, self.split
        moves = [(request, self.num_layers - split) for request in first.scheduler.running] + \
            [(request, split) for request in second.scheduler.running]
        carried, stall = self._exchange(moves, first.scheduler)
        taken = [(self.first, r) for r in first.scheduler.take_all_for_recompute()] + \
            [(self.second, r) for r in second.scheduler.take_all_for_recompute()]
        freed = first.drop_layers(self.num_layers - order.first_keeps) + second.drop_layers(order.second_from)
        first.kv.hold_layers(range(0, split))
        second.kv.hold_layers(range(split, self.num_layers))
        self._saved = (first.scheduler.kv, first.runner)
        self.runner = PipelineExecutor(first.runner, first.cost, split, self.link_bytes_per_s, self.options)
        first.scheduler.kv = PipelineKV([first.kv, second.kv])
        first.runner = self.runner
        for home, request in sorted(taken, key=lambda item: item[1].arrival_time):
            self.homes[request.request_id] = home
            self._place(first.scheduler, request, carried)
        for replica in (self.first, self.second):
            replica.clock = max(replica.clock, now + stall)
        return freed

    def grow(self, order: DropOrder) -> int:
        """Drops more while formed (the plan's `grows`): the first keeps [0, order.first_keeps), the second
        [order.second_from, L). The cut stays where it is, so only weights of layers a side does not run go:
        no KV moves, and the freed chunks are KV's in the next step. Returns the chunks freed."""
        first, second = grown_layers(self.num_layers, self.split, (self.order.first_keeps, self.order.second_from),
                                     (order.first_keeps, order.second_from))
        freed = self.first.engine.drop_layers(len(first)) + self.second.engine.drop_layers(len(second))
        self.order = order
        return freed

    def add(self, request: Request, home: SimReplica) -> None:
        """A request that arrived at `home` while the pair is dropped: the pipeline serves it."""
        self.homes[request.request_id] = home
        self.first.add(request)

    def restore(self, now: float) -> int:
        """Dissolves the pipeline at `now`; every request goes on at its home. Returns the chunks the weights
        took back."""
        first, second, split = self.first.engine, self.second.engine, self.split
        scheduler = first.scheduler
        moves = [(request, self.num_layers - split if self.homes[request.request_id] is self.first else split)
                 for request in scheduler.running]
        carried, kv_stall = self._exchange(moves, scheduler)
        taken = scheduler.take_all_for_recompute()
        scheduler.kv, first.runner = self._saved
        self._saved = None
        for engine in (first, second):
            engine.kv.hold_layers(range(self.num_layers))
        restored = 0
        for replica in (self.first, self.second):
            weight_bytes = len(replica.engine.dropped) * replica.engine.pool.chunk_bytes
            restored += replica.engine.restore_layers()
            replica.clock = max(replica.clock, now + kv_stall + weight_bytes / replica.engine.device.pcie_bytes_per_s)
        for request in taken:
            home = self.homes.pop(request.request_id)
            self._place(home.engine.scheduler, request, carried)
        return restored

    def _place(self, scheduler, request: Request, carried: dict[str, CarriedKV]) -> None:
        was_running = request.request_id in carried or bool(request.output_token_ids)
        if place(scheduler, request, carried.get(request.request_id)):
            self.num_carried += 1
        elif was_running:
            self.num_recomputed += 1
