"""A cooperative pair across two processes (KunServe), the follower's side: stage 2.

The follower keeps layers [second_from, L). Forming the pair, it hands its requests in flight to the
leader (snapshots, with layers [0, split) of the KV of those the carry policy copies; it keeps their other
layers until the leader has placed them), drops its first layers, keeps KV pages only for layers
[split, L) and offers the leader its available KV chunks (the pair's scheduler charges each step's workspace
against both stages) as the budget of
the leader's shadow of its KV manager (remote.py). From then on it serves the leader's messages:

- "step": the layout log since the last message (replayed on its own pool: memory/kv/mirror.py into its
  KV manager's layout, whose layer mask keeps only its layers' pages) and the step's micro-batches; per
  micro-batch it receives stage 1's hidden states, runs its layers, and sends back the final hidden
  states of the rows that sample; then its busy time (for the bubble ratio).
- "sync": the log, and the outputs of the requests whose clients are connected here (returned by
  `serve_one`, for their streams); it answers with its inbox: new requests and aborts from its clients.
- "grow": layers to drop more (ones stage 1 runs, so no KV moves); it answers with the chunks freed,
  which the leader's shadow then offers to its KV.
- "carry" (once, right after forming): the log that maps the pages of the requests the leader placed with
  their KV; it writes layers [split, L) of each: its own requests' from what it kept while forming, the
  leader's as they come over the channel (carry.py decides copy or recompute per request, by cost).
- "restore": the log (which frees every page), its requests back as snapshots and the requests whose KV is
  copied: before replaying the log it reads their layers [split, L) (sending the leader's own requests'
  to it), then copies its weights back from the host copy and serves alone again, its requests placed with
  their KV (layers [0, split) from the leader) or recomputing it.

If the leader dies (`PeerLost`), the follower restores its layers from its host copy and serves alone;
its requests that were running on the pipeline end with a clear error (their state was on the leader).
"""

from __future__ import annotations

import threading
import time

import torch

from engine.api import GenerateRequest, RequestOutput
from engine.cooperative.carry import CarriedKV, CarryPolicy, place, snapshot, spread
from engine.cooperative.channel import PairChannel, PeerLost
from engine.cooperative.pipeline import pipeline_split
from engine.cooperative.remote import snapshot_of
from engine.core.engine import LLMEngine
from engine.migration import KVStage, attach, request_from_snapshot
from memory.kv.mirror import LayoutMirror

LEADER_ERROR = "the replica serving the other half of this request's layers failed"


class RemoteFollower:
    def __init__(self, engine: LLMEngine, channel: PairChannel, carry: CarryPolicy | None = None):
        self.engine = engine
        self.carry = carry or CarryPolicy()
        self.num_carried = 0  # its requests placed here with their KV copied back (restoring)
        self.num_recomputed = 0  # its requests that had KV and recompute it (forming; restoring: only if no room)
        self._kept: dict[str, list] = {}  # forming: its copied requests' KV until the leader placed them
        self.channel = channel
        self.is_formed = False
        self.split = engine.model_config.num_layers
        self.forwarded: set[str] = set()  # this replica's requests running on the leader
        self.num_steps = 0
        self._mirror: LayoutMirror | None = None
        self._inbox: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    # ---- forming -----------------------------------------------------------------------------------
    def form(self, first_keeps: int, second_from: int) -> int:
        engine = self.engine
        num_layers = engine.model_config.num_layers
        split = pipeline_split(num_layers, first_keeps, second_from)
        engine.drop_state = "dropping"
        scheduler = engine.scheduler
        carried = snapshot(scheduler, lambda request_id, n: engine.kv.read_kv(request_id, 0, n), self.carry,
                           2 * engine.kv_spec.bytes_per_token, lambda _: split)  # layers [0, split) move
        self.num_recomputed += sum(request.request_id not in carried and request.num_computed_tokens > 0
                                   for request in scheduler.running)
        snapshots = [snapshot_of(request, carried[request.request_id].num_tokens if request.request_id in carried
                                 else 0) for request in scheduler.take_all_for_recompute()]
        self._kept = {request_id: kv.layers[split:] for request_id, kv in carried.items()}
        freed = engine.drop_layers(range(0, second_from))
        engine.kv.hold_layers(range(split, num_layers))
        self._mirror = LayoutMirror(engine.kv_spec, engine.pool, engine.dtype, existing=engine.kv.layout)
        # the shadow starts with what this replica's KV has available, as the leader's own stage does: the
        # pair's scheduler charges each step's workspace against both stages (PipelineKV: the tighter one), and
        # stage 2's own workspace is no larger (it computes no logits: `_step` carves no room for them).
        # Keeping a full step's workspace back here as well charged it twice (measured through Serve: a
        # request waited 9 s for ~250 chunks this replica had free)
        budget = engine.kv.num_available_chunks()
        with self._lock:
            self.forwarded = {snapshot.request_id for snapshot in snapshots}
            self.is_formed = True
        self.split = split
        self.channel.send_object(("formed", budget, snapshots))
        for item in snapshots:  # the leader receives them in this order
            if item.request_id in carried:
                self.channel.send_stage(KVStage(0, item.num_computed_tokens, carried[item.request_id].layers[:split]))
        engine.drop_state = "dropped"
        return freed

    # ---- this replica's clients ----------------------------------------------------------------------
    def submit(self, request: GenerateRequest) -> None:
        """A request from a client connected here: runs on the pipeline while formed (any thread)."""
        with self._lock:
            if self.is_formed:
                self.engine.validate(request)
                self._inbox.append(("add", request))
                self.forwarded.add(request.request_id)
                return
        self.engine.add_request(request)

    def abort(self, request_id: str) -> RequestOutput | None:
        with self._lock:
            if self.is_formed:
                self._inbox.append(("abort", request_id))
                self.forwarded.discard(request_id)
                return None
        return self.engine.abort(request_id)

    # ---- serving the leader --------------------------------------------------------------------------
    def serve_one(self) -> list[RequestOutput]:
        """Handles the leader's next message; returns outputs of this replica's requests."""
        try:
            message = self.channel.recv_object()
            kind, log = message[0], message[1]
            if kind == "restore":  # it reads the KV going back before the log frees its pages
                self._restore(log, *message[2:])
                return []
            self._mirror.apply(log)
            if kind == "carry":
                self._carry(message[2])
                return []
            if kind == "step":
                self._step(message[2])
                return []
            if kind == "sync":
                return self._sync(message[2])
            if kind == "grow":
                freed = self.engine.drop_layers(message[2])  # layers it holds but stage 1 runs: no KV moves
                self.channel.send_object(("grown", freed))
                return []
            raise RuntimeError(f"unknown pair message {kind!r}")
        except PeerLost:
            return self._leader_lost()

    def tick(self) -> list[RequestOutput]:  # engine/async_engine.py drives the pair through this
        return self.serve_one()

    def is_idle(self) -> bool:
        return False  # it waits for the leader's next message (the leader paces the pair)

    def _step(self, micro_batches) -> None:
        runner = self.engine.runner
        model = runner.model
        layers = range(self.split, self.engine.model_config.num_layers)
        busy = 0.0
        for micro in micro_batches:
            batch = runner.build_batch(micro)
            plan = model.buffer_plan(batch.num_tokens, 1)  # no logits here: the leader computes them
            workspace = runner.workspace.acquire(plan.num_bytes)
            try:
                with torch.inference_mode():
                    buffers = plan.carve(workspace)
                    self.channel.recv_tensor(buffers["hidden"])  # waiting for stage 1 is idle time
                    started = time.perf_counter()
                    hidden = model.forward_stage(batch, runner.kv.layer_caches(), buffers, layers, embed=False)
                    self.channel.send_tensor(hidden.index_select(0, batch.logits_indices))
                    busy += time.perf_counter() - started
            finally:
                runner.workspace.release()
        self.channel.send_tensor(torch.tensor([busy], dtype=torch.float64))
        self.channel.flush()
        self.num_steps += 1

    def _sync(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        with self._lock:
            inbox, self._inbox = self._inbox, []
            for output in outputs:
                if output.is_finished:
                    self.forwarded.discard(output.request_id)
        self.channel.send_object(inbox)
        return outputs

    def _carry(self, entries) -> None:
        """Forming, once the leader placed the requests it carried (the log mapped their pages here): writes
        layers [split, L) of each, this replica's own from what it kept, the leader's as they come."""
        num_layers, layout = self.engine.model_config.num_layers, self.engine.kv.layout
        for request_id, slot, _, is_leaders in entries:
            layers = self.channel.recv_stage().layers if is_leaders else self._kept.pop(request_id)
            layout.write_tokens(slot, 0, spread(num_layers, {self.split: layers}))
        self.num_recomputed += len(self._kept)  # the leader had no room for these: they recompute there
        self._kept = {}

    def _restore(self, log, snapshots, entries) -> None:
        """Reads layers [split, L) of every request the leader copies (sending the leader's own to it), replays
        the log, copies its weights back and takes its requests back: with their KV (layers [0, split) from the
        leader) or recomputing it; tokens so far kept. If the leader is lost meanwhile, every request it sent
        back recomputes (its snapshot is all it needs)."""
        engine = self.engine
        engine.drop_state = "restoring"
        num_layers, split = engine.model_config.num_layers, self.split
        kept, first_half, lost = {}, {}, False
        try:
            for request_id, slot, tokens, is_mine in entries:
                layers = engine.kv.layout.read_tokens(slot, 0, tokens)[split:]
                if is_mine:
                    kept[request_id] = layers
                else:
                    self.channel.send_stage(KVStage(0, tokens, layers))
        except PeerLost:
            lost = True
        with self._lock:
            self._mirror.apply(log)
            self._leave()
            engine.restore_layers(range(num_layers))
            try:
                first_half = {} if lost else {request_id: self.channel.recv_stage().layers for request_id in kept}
            except PeerLost:
                lost, first_half = True, {}
            for item in snapshots:
                if item.request_id in first_half:
                    carried = CarriedKV(item.num_computed_tokens, first_half[item.request_id] + kept[item.request_id])
                    placed = place(engine.scheduler, request_from_snapshot(engine, item), carried)
                    self.num_carried += placed
                    self.num_recomputed += not placed
                else:
                    attach(engine, item, 0)  # recomputes its KV here, its tokens so far kept
            self.forwarded.clear()
            self._add_unsent()
        if not lost:
            self.channel.send_object("restored")
            self.channel.flush()
        self.channel.close()
        engine.drop_state = "normal"

    def _leader_lost(self) -> list[RequestOutput]:
        engine = self.engine
        self.channel.close()
        self._kept = {}
        with self._lock:
            if self._mirror is not None:
                self._leave()
            engine.restore_layers(range(engine.model_config.num_layers))
            self._add_unsent()
            ended = [RequestOutput(request_id, (), "", "error", 0, 0, error=LEADER_ERROR)
                     for request_id in sorted(self.forwarded)]
            self.forwarded.clear()
        engine.drop_state = "normal"
        return ended

    def _leave(self) -> None:
        self._mirror.close()
        self._mirror = None
        self.engine.kv.hold_layers(range(self.engine.model_config.num_layers))
        self.split = self.engine.model_config.num_layers
        self.is_formed = False

    def _add_unsent(self) -> None:
        """Requests submitted since the last sync never reached the leader: they run here."""
        for kind, payload in self._inbox:
            if kind == "add":
                self.forwarded.discard(payload.request_id)
                self.engine.add_request(payload)
            else:
                self.engine.abort(payload)
        self._inbox = []
