"""A cross-process pair's leader runner (KunServe): stage 1 here, stage 2 in the follower's process.

A step (`RemotePipelineRunner.run`) sends the plan cut in micro-batches, then per micro-batch runs stage 1
and sends its hidden states without waiting, so the follower computes micro-batch i while the leader
computes i+1; the follower sends back the final hidden states of the rows that sample and its busy time.
The leader applies the final norm and lm head (its shared tensors are never dropped) and samples with the
requests' own sampling states, so seeded sampling is exact.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from engine.cooperative.channel import PairChannel
from engine.cooperative.pipeline import MicroBatchCut, PipelineStats, num_sampled
from engine.core.runner import ModelRunner
from engine.core.sampler import SampleResult, SamplingState, rows_of
from engine.core.sampling_workspace import SampledRows, sampling_plan
from engine.core.scheduler import SchedulerOutput


class RemotePipelineRunner:
    """The leader's runner while the pair is formed: stage 1 here, stage 2 in the follower's process."""

    def __init__(self, first: ModelRunner, split: int, channel: PairChannel, layout_log: list,
                 cut: MicroBatchCut | None = None):
        self.first = first
        self.first_layers = range(0, split)
        self.channel = channel
        self.layout_log = layout_log
        self.cut = cut or MicroBatchCut()
        self.sampler = first.sampler
        self.stats = PipelineStats()

    def missing_layers(self) -> frozenset[int]:
        return self.first.model.dropped_layers.intersection(self.first_layers)

    def activation_chunks(self, num_tokens: int, rows: SampledRows) -> int:
        return self.first.activation_chunks(num_tokens, rows)

    def activation_chunks_charged_to_kv(self, num_tokens: int, rows: SampledRows) -> int:
        return self.first.activation_chunks_charged_to_kv(num_tokens, rows)

    def take_log(self) -> list:
        log = list(self.layout_log)
        self.layout_log.clear()
        return log

    def run(self, output: SchedulerOutput, states: Sequence[SamplingState]) -> SampleResult:
        started = time.perf_counter()
        micro_batches = self.cut.cut(output)
        self.channel.send_object(("step", self.take_log(), micro_batches))
        busy = 0.0
        model = self.first.model
        for micro in micro_batches:
            begun = time.perf_counter()
            batch = self.first.build_batch(micro)
            plan = model.buffer_plan(batch.num_tokens, max(num_sampled(micro), 1))
            workspace = self.first.workspace.acquire(plan.num_bytes)
            try:
                with torch.inference_mode():
                    hidden = model.forward_stage(batch, self.first.kv.layer_caches(), plan.carve(workspace),
                                                 self.first_layers, embed=True)
                    self.channel.send_tensor(hidden.clone())  # the workspace is reused by the next micro-batch
            finally:
                self.first.workspace.release()
            busy += time.perf_counter() - begun
        token_ids, logprobs, offset = [], [], 0
        for micro in micro_batches:
            rows = num_sampled(micro)
            last = self.channel.recv_tensor(torch.empty(rows, model.config.hidden_size, dtype=model.dtype))
            begun = time.perf_counter()
            result = self._sample(last, list(states[offset:offset + rows]))
            busy += time.perf_counter() - begun
            token_ids += result.token_ids
            logprobs += result.logprobs
            offset += rows
        follower_busy = self.channel.recv_tensor(torch.empty(1, dtype=torch.float64))
        self.channel.flush()
        self.stats.add(PipelineStats(1, len(micro_batches), time.perf_counter() - started,
                                     (busy, float(follower_busy.item()))))
        return SampleResult(token_ids, logprobs)

    def _sample(self, last: torch.Tensor, states: list[SamplingState]) -> SampleResult:
        rows = last.shape[0]
        if rows == 0:
            return SampleResult([], [])
        model = self.first.model
        plan = model.buffer_plan(rows, rows)
        sampler_bytes = sampling_plan(rows_of(states), model.config.vocab_size).num_bytes
        workspace = self.first.workspace.acquire(plan.num_bytes + sampler_bytes)
        try:
            with torch.inference_mode():
                buffers = plan.carve(workspace)
                buffers["hidden"][:rows].copy_(last)
                indices = SimpleNamespace(logits_indices=torch.arange(rows, device=last.device))
                logits = model.compute_logits(indices, buffers)[:rows]
                return self.sampler.sample(logits, states, workspace[plan.num_bytes:])
        finally:
            self.first.workspace.release()

    def close(self) -> None:
        pass
