"""ModelRunner: turns a SchedulerOutput into tensors, runs the model in the step's workspace, samples."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from engine.core.forward_batch import ForwardBatch, PrefillChunk
from engine.core.layer_staging import COPY_ENGINES, LayerStager, StagedCopy, StagingStats, step_staging_plan
from engine.core.sampler import Sampler, SampleResult, SamplingState, rows_of
from engine.core.sampling_workspace import SampledRows, sampling_plan
from engine.core.scheduler import SchedulerOutput
from engine.device.activation_workspace import ActivationWorkspace
from engine.model.registry import DecoderModel
from memory.kv import KVCacheManager
from memory.kv.mirror import LayoutMirror

if TYPE_CHECKING:
    from engine.parallel.executor import TensorParallelExecutor


class ModelRunner:
    def __init__(self, model: DecoderModel, kv: KVCacheManager | LayoutMirror, workspace: ActivationWorkspace,
                 sampler: Sampler | None, executor: TensorParallelExecutor | None = None,
                 kv_staging: str = "copy", staging_stats: StagingStats | None = None):
        self.model = model
        self.executor = executor
        self.kv = kv
        self.workspace = workspace
        self.sampler = sampler
        self.device = model.embed.device
        self.copies = COPY_ENGINES[kv_staging](self.device)  # stages offloaded layers' KV (LayerKV)
        self.staging_stats = staging_stats or StagingStats()
        vocab_size = model.config.vocab_size
        self._activation_bytes = lru_cache(maxsize=4096)(
            lambda num_tokens, rows: (model.buffer_plan(num_tokens, max(rows.num_rows, 1)).num_bytes
                                      + sampling_plan(rows, vocab_size).num_bytes)
        )

    def missing_layers(self) -> frozenset[int]:
        """Layers a step needs whose weights are not here (dropped): the step cannot run."""
        return self.model.dropped_layers

    def activation_chunks(self, num_tokens: int, rows: SampledRows) -> int:
        """Workspace pages a step of `num_tokens` tokens with these sampled rows needs: the model's
        buffers and the sampler's temporaries."""
        if num_tokens == 0:
            return 0
        return self.workspace.num_pages_for(self._activation_bytes(num_tokens, rows))

    def activation_chunks_charged_to_kv(self, num_tokens: int, rows: SampledRows) -> int:
        """What the scheduler must keep free of KV for a step of this size (see ActivationWorkspace)."""
        return self.workspace.pages_charged_to_kv(self.activation_chunks(num_tokens, rows))

    def build_batch(self, output: SchedulerOutput) -> ForwardBatch:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        for chunk in output.decodes:
            input_ids.append(chunk.token_ids[0])
            positions.append(chunk.start)
            slots.append(chunk.slot)
        prefills = []
        forks = dict(output.forks)  # a leader's row is sampled once more for each of its forks (n > 1)
        logits_rows = [row for row, chunk in enumerate(output.decodes)
                       for _ in range(1 + len(forks.get(chunk.request_id, ())))]
        for chunk in output.prefills:
            offset = len(input_ids)
            count = len(chunk.token_ids)
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + count))
            slots.extend([chunk.slot] * count)
            prefills.append(PrefillChunk(chunk.slot, chunk.start, count, offset))
            if chunk.samples:
                logits_rows.extend([offset + count - 1] * (1 + len(forks.get(chunk.request_id, ()))))
        decode_slots = [chunk.slot for chunk in output.decodes]
        context_lens = [chunk.start + 1 for chunk in output.decodes]

        def as_tensor(values: Sequence[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=self.device)

        return ForwardBatch(
            input_ids=as_tensor(input_ids),
            positions=as_tensor(positions),
            token_slots=as_tensor(slots),
            num_decode_tokens=len(decode_slots),
            decode_slots=as_tensor(decode_slots),
            decode_context_lens=as_tensor(context_lens),
            decode_slots_are_prefix=decode_slots == list(range(len(decode_slots))),
            max_decode_context_len=max(context_lens, default=0),
            prefills=tuple(prefills),
            logits_indices=as_tensor(logits_rows),
        )

    def _forward(self, output: SchedulerOutput, rows: SampledRows | None,
                 staging: list[list[StagedCopy]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the model for the step in a freshly acquired workspace, staging the host pages `staging`
        names; returns the sampled rows' logits and the workspace's bytes left for the sampler (sized for
        `rows`; none when None). The caller releases the workspace once it is done with both."""
        batch = self.build_batch(output)
        num_sampled = int(batch.logits_indices.shape[0])
        plan = self.model.buffer_plan(batch.num_tokens, max(num_sampled, 1))
        sampler_bytes = sampling_plan(rows, self.model.config.vocab_size).num_bytes if rows is not None else 0
        workspace = self.workspace.acquire(plan.num_bytes + sampler_bytes)
        stager = self._stager(staging)
        try:
            with torch.inference_mode():
                logits = self.model.forward(batch, self.kv.layer_caches(), plan.carve(workspace), stager)
        finally:
            if stager is not None:
                stager.close()
        self.staging_stats.record(stager)
        return logits[:num_sampled], workspace[plan.num_bytes:]

    def _stager(self, staging: list[list[StagedCopy]] | None) -> LayerStager | None:
        """Stages the host-resident layers of this step's requests (None when nothing is offloaded). A
        tensor-parallel worker stages its own heads' share of the same pages (its host buffer mirrors rank 0's)."""
        if staging is None:
            return None
        return LayerStager(self.kv.layout, self.kv.host_buffer, self.kv.pool, staging, self.copies,
                           self.kv.spec.tokens_per_page, self.workspace.give_back)

    def run(self, output: SchedulerOutput, states: Sequence[SamplingState]) -> SampleResult:
        """Runs one step. `states` are the sampling states of the rows that sample, in row order
        (decodes, then the prefill chunks that end a prompt)."""
        staging = step_staging_plan(self.kv, output) if isinstance(self.kv, KVCacheManager) else None
        if self.executor is not None:
            self.executor.broadcast_step(output, staging)
        try:
            logits, sampler_workspace = self._forward(output, rows_of(states), staging)
            if logits.shape[0] == 0:
                return SampleResult([], [])
            with torch.inference_mode():
                return self.sampler.sample(logits, states, sampler_workspace)
        finally:
            self.workspace.release()

    def forward_only(self, output: SchedulerOutput) -> None:
        """A tensor-parallel worker's step: same computation, no sampling."""
        try:
            self._forward(output, None, self.kv.take_staging_plan())
        finally:
            self.workspace.release()
