"""A cooperative pair across two processes (KunServe), the leader's side: stage 1 and the pair's scheduler.

The leader is the replica that keeps the first layers; the follower (follower.py, another process) keeps
the last ones. While the pair is formed the leader's scheduler plans for both, as in one process
(pair.py): its KV manager becomes a PipelineKV over its own manager (the KV of layers [0, split)) and a
*shadow* of the follower's: a KVCacheManager on a bookkeeping-only pool (memory/vmm/sim.py) of exactly the
chunks the follower offered, holding layers [split, L). The shadow answers the scheduler's questions at
once and logs its layout calls; each message to the follower carries the log, which the follower replays
on its own pool (memory/kv/mirror.py with a layer mask), as tensor-parallel ranks replay rank 0's. So a
request has the same slot and pages on both sides and neither side can run out of KV the other planned.

A step (`RemotePipelineRunner.run`) sends the plan cut in micro-batches, then per micro-batch runs stage 1
and sends its hidden states without waiting, so the follower computes micro-batch i while the leader
computes i+1; the follower sends back the final hidden states of the rows that sample and its busy time.
The leader applies the final norm and lm head (its shared tensors are never dropped) and samples with the
requests' own sampling states, so seeded sampling is exact.

Requests keep a home: those that arrived at the follower (forwarded by it) stream their outputs back to
it in a "sync" message after each step, which also brings the follower's new requests and aborts. Forming
and dissolving recompute every request in flight (the cross-process carry; tokens so far are kept: none is
lost or repeated). If the follower dies (`PeerLost`), the leader restores its layers from its host copy,
serves its own requests alone, and ends the follower's with an error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from types import SimpleNamespace

import torch

from engine.api import RequestOutput
from engine.cooperative.carry import place
from engine.cooperative.channel import PairChannel, PeerLost
from engine.cooperative.kv import PipelineKV
from engine.cooperative.pipeline import PipelineStats, grown_layers, num_sampled, pipeline_split, split_micro_batches
from engine.core.engine import LLMEngine
from engine.core.request import Request
from engine.core.runner import ModelRunner
from engine.core.sampler import SampleResult, SamplingState, rows_of
from engine.core.sampling_workspace import SampledRows, sampling_plan
from engine.core.scheduler import SchedulerOutput
from engine.migration import RequestSnapshot, attach
from memory.kv import KVCacheManager
from memory.pool import ElasticPool
from memory.vmm.sim import SimBackend


def snapshot_of(request: Request) -> RequestSnapshot:
    """A request's state for the other process (its KV is recomputed there)."""
    return RequestSnapshot(request.request_id, tuple(request.prompt_token_ids), tuple(request.output_token_ids),
                           request.sampling.export_state(),
                           request.detokenizer.export_state() if request.detokenizer is not None else {},
                           request.arrival_time, request.num_cached_tokens, 0)


RESERVE = "offered_later"  # the shadow pool's chunks the follower has not offered (yet): it frees them by growing


def shadow_kv(engine: LLMEngine, budget_chunks: int, layers: range, log: list,
              reserve_chunks: int = 0) -> tuple[KVCacheManager, list]:
    """The follower's KV manager as the leader plans with it: same spec and layout, `budget_chunks` chunks
    now; `reserve_chunks` more that its KV gets only as the follower offers them (`offer`). Returns it and
    the reserve's chunks."""
    spec = engine.kv_spec
    # the largest power of two dividing a page: the sim backend's addresses stay aligned to it
    pool = ElasticPool(SimBackend(granularity=spec.page_bytes & -spec.page_bytes),
                       (max(1, budget_chunks) + reserve_chunks) * spec.page_bytes, spec.page_bytes)
    pool.register(RESERVE)  # never reclaimed: no callback
    reserve = pool.inflate(RESERVE, reserve_chunks) if reserve_chunks else []
    kv = KVCacheManager(spec, pool, engine.dtype, layout=engine.config.kv_layout, enable_prefix_caching=False,
                        layout_log=log)
    kv.hold_layers(layers)
    return kv, reserve


class RemotePipelineRunner:
    """The leader's runner while the pair is formed: stage 1 here, stage 2 in the follower's process."""

    def __init__(self, first: ModelRunner, split: int, channel: PairChannel, layout_log: list,
                 num_micro_batches: int = 2, min_micro_batch_tokens: int = 64):
        self.first = first
        self.first_layers = range(0, split)
        self.channel = channel
        self.layout_log = layout_log
        self.num_micro_batches = num_micro_batches
        self.min_micro_batch_tokens = min_micro_batch_tokens
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
        count = min(self.num_micro_batches, max(1, output.num_tokens // self.min_micro_batch_tokens))
        micro_batches = split_micro_batches(output, count)
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


class RemoteLeader:
    """The leader's end of a cross-process pair. `step()` returns the outputs of this replica's own
    requests; the follower's go back to it over the channel."""

    def __init__(self, engine: LLMEngine, channel: PairChannel, num_micro_batches: int = 2,
                 min_micro_batch_tokens: int = 64):
        self.engine = engine
        self.channel = channel
        self.num_micro_batches = num_micro_batches
        self.min_micro_batch_tokens = min_micro_batch_tokens
        self.is_formed = False
        self.split = engine.model_config.num_layers
        self.peer_requests: set[str] = set()  # requests whose client is on the follower
        self.stats = PipelineStats()
        self.num_peer_requests_finished = 0  # the follower's requests that ended here while the pair was formed
        self.num_peer_requests_ended = 0  # the follower's requests dropped when it died
        self._runner: RemotePipelineRunner | None = None
        self._shadow: KVCacheManager | None = None
        self._saved = None
        self._runner_log: list = []
        self._refused: list[RequestOutput] = []  # the follower's requests this replica could not take
        self._reserve: list = []  # the shadow's chunks the follower has not offered yet
        self.kept = (self.split, 0)  # (first_keeps, second_from) while formed

    # ---- forming -----------------------------------------------------------------------------------
    def form(self, first_keeps: int, second_from: int) -> int:
        """Drops layers [first_keeps, L) here once the follower dropped its first ones and offered its KV
        budget; every request of both then runs on the pipeline. Returns the chunks freed here."""
        engine = self.engine
        num_layers = engine.model_config.num_layers
        split = pipeline_split(num_layers, first_keeps, second_from)
        kind, budget, snapshots = self.channel.recv_object()
        if kind != "formed":
            raise RuntimeError(f"the follower answered {kind!r} to forming the pair")
        engine.drop_state = "dropping"
        taken = engine.scheduler.take_all_for_recompute()
        freed = engine.drop_layers(range(first_keeps, num_layers))
        engine.kv.hold_layers(range(0, split))
        log: list = []
        # the follower may later drop its layers [second_from, split) too (`grow`) and offer their chunks
        self._shadow, self._reserve = shadow_kv(engine, budget, range(split, num_layers), log,
                                                engine.rank.arena.layer_chunks(range(second_from, split)))
        scheduler = engine.scheduler
        self._saved = (scheduler.kv, engine.runner, scheduler.activation_chunks)
        self._runner = RemotePipelineRunner(engine.runner, split, self.channel, log, self.num_micro_batches,
                                            self.min_micro_batch_tokens)
        scheduler.kv = PipelineKV([engine.kv, self._shadow])
        scheduler.activation_chunks = self._runner.activation_chunks_charged_to_kv
        engine.runner = self._runner
        self.split = split
        self.kept = (first_keeps, second_from)
        self.is_formed = True
        for item in sorted([*taken, *snapshots], key=lambda item: item.arrival_time):
            if isinstance(item, Request):
                place(scheduler, item, None)
            else:
                attach(engine, item, 0)
                self.peer_requests.add(item.request_id)
        engine.drop_state = "dropped"
        return freed

    def grow(self, first_keeps: int, second_from: int) -> int:
        """Drops more while formed (the drop plan's `grows`): the follower drops its layers up to
        `second_from` and offers their chunks, which the shadow's KV gets from its reserve; this replica
        drops [first_keeps, ...). The cut stays, so no request's KV moves. Returns the chunks freed here
        (0 if the follower died meanwhile: the pair then ended)."""
        if not self.is_formed:
            raise RuntimeError("the pair is not formed")
        mine, theirs = grown_layers(self.engine.model_config.num_layers, self.split, self.kept,
                                    (first_keeps, second_from))
        try:
            self.channel.send_object(("grow", self._runner.take_log(), theirs))
            kind, offered = self.channel.recv_object()
        except PeerLost:
            self._peer_lost()
            return 0
        if kind != "grown":
            raise RuntimeError(f"the follower answered {kind!r} to growing the drop")
        offered, self._reserve = self._reserve[:offered], self._reserve[offered:]
        self._shadow.pool.deflate(RESERVE, offered)
        freed = self.engine.drop_layers(mine)
        self.kept = (first_keeps, second_from)
        return freed

    # ---- serving -----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step of the pair (if there is work) and one exchange with the follower (its new requests,
        aborts and the outputs of its requests). Returns this replica's own outputs."""
        if not self.is_formed:
            return self.engine.step() if self.engine.has_work else []
        mine, theirs = [], []
        try:
            outputs = self.engine.step() if self.engine.has_work else []  # a failed step changed no tokens
            self.engine.pipeline_bubble_ratio = self.bubble_ratio
            for output in outputs:
                is_theirs = output.request_id in self.peer_requests
                (theirs if is_theirs else mine).append(output)
                if output.is_finished and is_theirs:
                    self.peer_requests.discard(output.request_id)
                    self.num_peer_requests_finished += 1
            theirs += self._refused
            self._refused = []
            self.channel.send_object(("sync", self._runner.take_log(), theirs))
            inbox = self.channel.recv_object()
        except PeerLost:
            self._peer_lost()
            return mine
        for kind, payload in inbox:
            if kind == "add":
                try:
                    self.engine.add_request(payload)
                    self.peer_requests.add(payload.request_id)
                except Exception as error:  # noqa: BLE001 - the follower's client hears it next sync
                    self._refused.append(RequestOutput(payload.request_id, (), "", "error",
                                                       len(payload.prompt_token_ids), 0, error=str(error)))
            else:
                self.engine.abort(payload)
                self.peer_requests.discard(payload)
        return mine

    def tick(self) -> list[RequestOutput]:  # engine/async_engine.py drives the pair through this
        return self.step()

    def is_idle(self) -> bool:
        return not self.engine.has_work

    # ---- dissolving --------------------------------------------------------------------------------
    def restore(self) -> int:
        """Both replicas serve alone again: the follower's requests go back to it (to recompute), this
        replica copies its dropped layers back. Returns the chunks the weights took back here."""
        engine = self.engine
        engine.drop_state = "restoring"
        taken = self._dissolve()
        back = [snapshot_of(request) for request in taken if request.request_id in self.peer_requests]
        self.channel.send_object(("restore", self._runner_log, back))
        restored = engine.restore_layers(range(engine.model_config.num_layers))
        for request in taken:
            if request.request_id not in self.peer_requests:
                place(engine.scheduler, request, None)
        self.peer_requests.clear()
        answer = self.channel.recv_object()
        self.channel.flush()
        engine.drop_state = "normal"
        if answer != "restored":
            raise RuntimeError(f"the follower answered {answer!r} to the restore")
        return restored

    def _dissolve(self) -> list[Request]:
        engine = self.engine
        scheduler = engine.scheduler
        taken = scheduler.take_all_for_recompute()  # frees the shadow's pages too: the log says so
        self._runner_log = self._runner.take_log()
        self.stats.add(self._runner.stats)
        scheduler.kv, engine.runner, scheduler.activation_chunks = self._saved
        self._shadow.close()
        self._shadow.pool.close()
        self._runner = self._saved = self._shadow = None
        self._reserve = []
        self.kept = (engine.model_config.num_layers, 0)
        engine.kv.hold_layers(range(engine.model_config.num_layers))
        self.split = engine.model_config.num_layers
        self.is_formed = False
        return taken

    def _peer_lost(self) -> None:
        """The follower died: restore from the host copy and go on alone (this replica's requests
        recompute the KV half of which was there); the follower's requests end here, their clients
        were connected to the dead process."""
        engine = self.engine
        taken = self._dissolve()
        engine.restore_layers(range(engine.model_config.num_layers))
        engine.drop_state = "normal"
        for request in taken:
            if request.request_id in self.peer_requests:
                self.num_peer_requests_ended += 1
            else:
                place(engine.scheduler, request, None)
        self.peer_requests.clear()

    @property
    def bubble_ratio(self) -> float:
        live = PipelineStats()
        live.add(self.stats)
        if self._runner is not None:
            live.add(self._runner.stats)
        return live.bubble_ratio
