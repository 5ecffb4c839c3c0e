"""The staged forward of a cooperative pair: stage 1 (embedding + the first layers) on one replica,
stage 2 (the remaining layers + lm head + sampling) on the other, micro-batched so both stages work at
once: while stage 2 runs micro-batch i, stage 1 already runs micro-batch i+1.

A step's rows (decodes, then prefill chunks, as the scheduler planned them) are cut into contiguous
micro-batches of about equal tokens; a prefill chunk may be cut in two (its second half runs after
its first half on each stage, so it sees the first half's KV). Sampled rows keep their order, so the
step's result is the micro-batches' results back to back.

Bubble ratio: the share of the two stages' time spent idle during steps,
1 - (busy stage 1 + busy stage 2) / (2 * wall time of the steps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from engine.cooperative.transport import HiddenTransport, QueueTransport
from engine.core.runner import ModelRunner
from engine.core.sampler import Sampler, SampleResult, SamplingState, rows_of
from engine.core.sampling_workspace import SampledRows, sampling_plan
from engine.core.scheduler import ScheduledChunk, SchedulerOutput


def pipeline_split(num_layers: int, first_keeps: int, second_from: int) -> int:
    """Where the pipeline cuts: the middle of the model, clamped into the layers both sides hold."""
    lowest, highest = max(second_from, 1), min(first_keeps, num_layers - 1)
    if not (0 <= second_from and first_keeps <= num_layers and lowest <= highest):
        raise ValueError(f"first keeps [0, {first_keeps}), second keeps [{second_from}, {num_layers}): "
                         "each must keep some layers and together all of them")
    return min(max(num_layers // 2, lowest), highest)


def grown_layers(num_layers: int, split: int, kept: tuple[int, int], grown: tuple[int, int]) -> tuple[range, range]:
    """The layers each side of a formed pair drops more when it goes from keeping `kept` to `grown`
    ((first_keeps, second_from) each): the first's and the second's. The cut stays at `split`, so a side
    only ever drops layers the other one runs: no KV moves."""
    (keeps, start), (new_keeps, new_start) = kept, grown
    if new_keeps > keeps or new_start < start:
        raise ValueError(f"going from {kept} to {grown} gives layers back: that is a restore")
    if new_keeps < split or new_start > split or new_keeps > num_layers:
        raise ValueError(f"keeping {grown} would drop layers a stage runs (the cut is at {split})")
    return range(new_keeps, keeps), range(start, new_start)


@dataclass(frozen=True)
class MicroBatchCut:
    """How many micro-batches a step is cut into; the one rule the in-process pair, the cross-process pair and
    the simulator (loadtest/sim/pair.py) use.

    Up to `num_micro_batches`, each of at least `min_tokens` tokens: decode steps of under 2 x `min_tokens`
    rows run whole (a micro-batch streams its stage's weights once more). With `min_decode_rows` > 0 a step
    is also cut by its decode rows, into up to `num_micro_batches` micro-batches of at least that many rows,
    so stage 1 runs the second half of a small decode batch while stage 2 runs the first (bubble hiding). Off
    by default: on this CPU box it does not pay (docs/KUNSERVE.md, "Cutting decode steps")."""

    num_micro_batches: int = 2
    min_tokens: int = 64
    min_decode_rows: int = 0

    def count(self, num_tokens: int, num_decodes: int) -> int:
        count = num_tokens // self.min_tokens
        if self.min_decode_rows > 0:
            count = max(count, num_decodes // self.min_decode_rows)
        return max(1, min(self.num_micro_batches, count))

    def cut(self, output: SchedulerOutput) -> list[SchedulerOutput]:
        return split_micro_batches(output, self.count(output.num_tokens, len(output.decodes)))

    def decode_rows(self, num_rows: int) -> list[int]:
        """The rows of each micro-batch of a step of `num_rows` decodes alone (what `cut` gives it)."""
        count = self.count(num_rows, num_rows)
        target = -(-num_rows // count)
        return [min(target, num_rows - start) for start in range(0, num_rows, target)] if num_rows else []


def split_micro_batches(output: SchedulerOutput, num_micro_batches: int) -> list[SchedulerOutput]:
    """Cuts a step into at most `num_micro_batches` contiguous pieces of about equal token counts."""
    target = -(-output.num_tokens // max(1, num_micro_batches))
    pieces: list[tuple[list[ScheduledChunk], list[ScheduledChunk]]] = [([], [])]
    filled = 0

    def room() -> int:
        return target - filled

    for chunk in output.decodes:
        if room() <= 0:
            pieces.append(([], []))
            filled = 0
        pieces[-1][0].append(chunk)
        filled += 1
    for chunk in output.prefills:
        while chunk is not None:
            if room() <= 0:
                pieces.append(([], []))
                filled = 0
            if len(chunk.token_ids) <= room():
                pieces[-1][1].append(chunk)
                filled += len(chunk.token_ids)
                chunk = None
            else:
                cut = room()
                pieces[-1][1].append(replace(chunk, token_ids=chunk.token_ids[:cut], samples=False))
                filled += cut
                chunk = replace(chunk, start=chunk.start + cut, token_ids=chunk.token_ids[cut:])
    return [SchedulerOutput(tuple(decodes), tuple(prefills), (), 0) for decodes, prefills in pieces
            if decodes or prefills]


def num_sampled(output: SchedulerOutput) -> int:
    return len(output.decodes) + sum(chunk.samples for chunk in output.prefills)


@dataclass
class PipelineStats:
    num_steps: int = 0
    num_micro_batches: int = 0
    wall_s: float = 0.0
    busy_s: tuple[float, float] = (0.0, 0.0)

    def add(self, other: PipelineStats) -> None:
        self.num_steps += other.num_steps
        self.num_micro_batches += other.num_micro_batches
        self.wall_s += other.wall_s
        self.busy_s = (self.busy_s[0] + other.busy_s[0], self.busy_s[1] + other.busy_s[1])

    @property
    def bubble_ratio(self) -> float:
        if self.wall_s <= 0:
            return 0.0
        return max(0.0, 1.0 - sum(self.busy_s) / (2 * self.wall_s))


class PipelineRunner:
    """Runs a step over two stages. `first` holds layers [0, split) of its replica, `second` holds
    [split, num_layers) of its own; each writes the KV of its layers into its replica's cache."""

    def __init__(self, first: ModelRunner, second: ModelRunner, split: int, sampler: Sampler,
                 transport: HiddenTransport | None = None, cut: MicroBatchCut | None = None):
        num_layers = first.model.config.num_layers
        if not 0 < split < num_layers:
            raise ValueError(f"split {split} must leave layers on both stages (0 < split < {num_layers})")
        self.first = first
        self.second = second
        self.first_layers = range(0, split)
        self.second_layers = range(split, num_layers)
        self.sampler = sampler
        self.transport = transport or QueueTransport()
        self.cut = cut or MicroBatchCut()
        self.stats = PipelineStats()
        self._stage_two = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-stage-2")
        self._busy_lock = threading.Lock()

    def missing_layers(self) -> frozenset[int]:
        return (self.first.model.dropped_layers.intersection(self.first_layers)
                | self.second.model.dropped_layers.intersection(self.second_layers))

    def activation_chunks(self, num_tokens: int, rows: SampledRows) -> int:
        return max(self.first.activation_chunks(num_tokens, rows), self.second.activation_chunks(num_tokens, rows))

    def activation_chunks_charged_to_kv(self, num_tokens: int, rows: SampledRows) -> int:
        return max(self.first.activation_chunks_charged_to_kv(num_tokens, rows),
                   self.second.activation_chunks_charged_to_kv(num_tokens, rows))

    def run(self, output: SchedulerOutput, states: Sequence[SamplingState]) -> SampleResult:
        """One step; `states` as for ModelRunner.run (sampled rows in order)."""
        started = time.perf_counter()
        busy = [0.0, 0.0]
        micro_batches = self.cut.cut(output)
        futures: list[Future] = []
        offset = sent = 0
        hidden_size = self.first.model.config.hidden_size
        try:
            for micro in micro_batches:
                batch = self.first.build_batch(micro)
                rows = num_sampled(micro)
                futures.append(self._stage_two.submit(self._second_stage, micro, batch,
                                                      list(states[offset:offset + rows]), busy))
                offset += rows
                self._first_stage(micro, batch, busy)
                sent += 1
        except BaseException:
            for micro in micro_batches[sent:len(futures)]:  # stage 2 waits for states that will not come
                self.transport.cancel(torch.empty(micro.num_tokens, hidden_size, dtype=self.first.model.dtype))
            raise
        finally:
            for future in futures:  # never return while stage 2 still uses its workspace
                future.exception()
        results = [future.result() for future in futures]
        self.stats.add(PipelineStats(1, len(micro_batches), time.perf_counter() - started, (busy[0], busy[1])))
        return SampleResult([t for r in results for t in r.token_ids], [p for r in results for p in r.logprobs])

    def _first_stage(self, micro: SchedulerOutput, batch, busy: list[float]) -> None:
        started = time.perf_counter()
        runner = self.first
        plan = runner.model.buffer_plan(batch.num_tokens, max(num_sampled(micro), 1))
        workspace = runner.workspace.acquire(plan.num_bytes)
        try:
            with torch.inference_mode():
                hidden = runner.model.forward_stage(batch, runner.kv.layer_caches(), plan.carve(workspace),
                                                    self.first_layers, embed=True)
                self.transport.send(hidden)
        finally:
            runner.workspace.release()
        busy[0] += time.perf_counter() - started

    def _second_stage(self, micro: SchedulerOutput, batch, states: list[SamplingState],
                      busy: list[float]) -> SampleResult:
        runner = self.second
        rows = num_sampled(micro)
        plan = runner.model.buffer_plan(batch.num_tokens, max(rows, 1))
        sampler_bytes = sampling_plan(rows_of(states), runner.model.config.vocab_size).num_bytes
        workspace = runner.workspace.acquire(plan.num_bytes + sampler_bytes)
        try:
            with torch.inference_mode():
                buffers = plan.carve(workspace)
                self.transport.recv(buffers["hidden"])  # waiting for stage 1 is idle time, not busy
                started = time.perf_counter()
                runner.model.forward_stage(batch, runner.kv.layer_caches(), buffers, self.second_layers,
                                           embed=False)
                logits = runner.model.compute_logits(batch, buffers)[:rows]
                result = (self.sampler.sample(logits, states, workspace[plan.num_bytes:]) if rows
                          else SampleResult([], []))
            busy[1] += time.perf_counter() - started
            return result
        finally:
            runner.workspace.release()

    def close(self) -> None:
        self._stage_two.shutdown(wait=True)
