"""A cooperative pair across two processes (KunServe), the leader's side: stage 1 and the pair's scheduler.

The leader is the replica that keeps the first layers; the follower (follower.py, another process) keeps
the last ones. While the pair is formed the leader's scheduler plans for both, as in one process
(pair.py): its KV manager becomes a PipelineKV over its own manager (the KV of layers [0, split)) and a
*shadow* of the follower's: a KVCacheManager on a bookkeeping-only pool (memory/vmm/sim.py) of exactly the
chunks the follower offered, holding layers [split, L). The shadow answers the scheduler's questions at
once and logs its layout calls; each message to the follower carries the log, which the follower replays
on its own pool (memory/kv/mirror.py with a layer mask), as tensor-parallel ranks replay rank 0's. So a
request has the same slot and pages on both sides and neither side can run out of KV the other planned.

A step runs on `RemotePipelineRunner` (remote_runner.py): stage 1 here, stage 2 on the follower.

Requests keep a home: those that arrived at the follower (forwarded by it) stream their outputs back to
it in a "sync" message after each step, which also brings the follower's new requests and aborts. Forming
and dissolving carry every request in flight (carry.py): its KV is copied over the channel — layers
[split, L) of the leader's requests to the follower on forming, each half to the replica that will hold it
on restoring — or recomputed, as the same `CarryPolicy` as the in-process pair decides from the layers that
change replica; tokens so far are kept, so none is lost or repeated. If the follower dies (`PeerLost`),
the leader restores its layers from its host copy, serves its own requests alone, and ends the
follower's with an error.
"""

from __future__ import annotations

from engine.api import RequestOutput
from engine.cooperative import carry as carrying
from engine.cooperative.carry import CarriedKV, CarryPolicy, place, snapshot, spread, to_copy
from engine.cooperative.channel import PairChannel, PeerLost
from engine.cooperative.kv import PipelineKV
from engine.cooperative.pipeline import MicroBatchCut, PipelineStats, grown_layers, pipeline_split
from engine.cooperative.remote_runner import RemotePipelineRunner
from engine.core.engine import LLMEngine
from engine.core.request import Request
from engine.migration import KVStage, RequestSnapshot, request_from_snapshot
from memory.kv import KVCacheManager
from memory.pool import ElasticPool
from memory.vmm.sim import SimBackend


def snapshot_of(request: Request, num_kv_tokens: int = 0) -> RequestSnapshot:
    """A request's state for the other process; `num_kv_tokens`: how many tokens of KV go with it (0: it
    recomputes its KV there)."""
    return RequestSnapshot(request.request_id, tuple(request.prompt_token_ids), tuple(request.output_token_ids),
                           request.sampling.export_state(),
                           request.detokenizer.export_state() if request.detokenizer is not None else {},
                           request.arrival_time, request.num_cached_tokens, num_kv_tokens)


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


class RemoteLeader:
    """The leader's end of a cross-process pair. `step()` returns the outputs of this replica's own
    requests; the follower's go back to it over the channel."""

    def __init__(self, engine: LLMEngine, channel: PairChannel, num_micro_batches: int = 2,
                 min_micro_batch_tokens: int = 64, carry: CarryPolicy | None = None, min_decode_rows: int = 0):
        self.engine = engine
        self.carry = carry or CarryPolicy()
        self.num_carried = 0  # requests whose KV this replica placed by copy (forming: both; restoring: its own)
        self.num_recomputed = 0  # requests that had KV and recompute it (forming: its own; restoring: both)
        self._layer_bytes_per_token = 2 * engine.kv_spec.bytes_per_token
        self.channel = channel
        self.cut = MicroBatchCut(num_micro_batches, min_micro_batch_tokens, min_decode_rows)
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
    def form(self, first_keeps: int, second_from: int, formed: tuple | None = None) -> int:
        """Drops layers [first_keeps, L) here once the follower dropped its first ones and offered its KV
        budget; every request of both then runs on the pipeline. Returns the chunks freed here. `formed`: the
        follower's first message if the caller received it already (off the engine thread), else received here."""
        engine = self.engine
        num_layers = engine.model_config.num_layers
        split = pipeline_split(num_layers, first_keeps, second_from)
        kind, budget, snapshots = formed if formed is not None else self.channel.recv_object()
        if kind != "formed":
            raise RuntimeError(f"the follower answered {kind!r} to forming the pair: {budget}")
        # layers [0, split) of the follower's requests it copies (it keeps [split, L) until "carry")
        theirs = {item.request_id: self.channel.recv_stage().layers for item in snapshots if item.num_computed_tokens}
        engine.drop_state = "dropping"
        mine = snapshot(engine.scheduler, lambda request_id, n: engine.kv.read_kv(request_id, 0, n), self.carry,
                        self._layer_bytes_per_token, lambda _: num_layers - split)
        was_running = {request.request_id for request in engine.scheduler.running}
        taken = engine.scheduler.take_all_for_recompute()
        freed = engine.drop_layers(range(first_keeps, num_layers))
        engine.kv.hold_layers(range(0, split))
        log: list = []
        # the follower may later drop its layers [second_from, split) too (`grow`) and offer their chunks
        self._shadow, self._reserve = shadow_kv(engine, budget, range(split, num_layers), log,
                                                engine.rank.arena.layer_chunks(range(second_from, split)))
        scheduler = engine.scheduler
        self._saved = (scheduler.kv, engine.runner, scheduler.activation_chunks)
        self._runner = RemotePipelineRunner(engine.runner, split, self.channel, log, self.cut)
        scheduler.kv = PipelineKV([engine.kv, self._shadow])
        scheduler.activation_chunks = self._runner.activation_chunks_charged_to_kv
        engine.runner = self._runner
        self.split = split
        self.kept = (first_keeps, second_from)
        self.is_formed = True
        reserved, entries = [], []
        for item in sorted([*taken, *snapshots], key=lambda item: item.arrival_time):
            if isinstance(item, Request):
                request, carried = item, mine.get(item.request_id)
            else:
                request = request_from_snapshot(engine, item)
                self.peer_requests.add(item.request_id)
                layers = theirs.get(item.request_id)
                carried = CarriedKV(item.num_computed_tokens, spread(num_layers, {0: layers})) if layers else None
                if layers:  # the follower counts the ones it chose to recompute
                    was_running.add(item.request_id)
            if carrying.reserve(scheduler, request, carried):
                reserved.append((request, carried))
                entries.append((request.request_id, scheduler.kv.slot_of(request.request_id), carried.num_tokens,
                                isinstance(item, Request)))
            else:
                carrying.recompute(scheduler, request)
                self.num_recomputed += request.request_id in was_running
        # the follower maps the reserved pages (the log), then writes layers [split, L): its own requests' from
        # what it kept, this replica's from here; only then do the pages of tokens past a window go
        self.channel.send_object(("carry", self._runner.take_log(), entries))
        for request_id, _, num_tokens, is_mine in entries:
            if is_mine:
                self.channel.send_stage(KVStage(0, num_tokens, mine[request_id].layers[split:]))
        for request, carried in reserved:
            carrying.settle(scheduler, request, carried)
        self.num_carried += len(reserved)
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
        num_layers, split, scheduler = engine.model_config.num_layers, self.split, engine.scheduler
        peers = self.peer_requests
        chosen = to_copy(self.carry, [(request, split if request.request_id in peers else num_layers - split)
                                      for request in scheduler.running], self._layer_bytes_per_token,
                         scheduler.cost_model)
        # (request, its slot on both sides, tokens, whether it goes to the follower); layers [0, split) are here
        entries = [(request_id, scheduler.kv.slot_of(request_id), tokens, request_id in peers)
                   for request_id, tokens in chosen.items()]
        first_half = {request_id: engine.kv.read_kv(request_id, 0, tokens)[:split]
                      for request_id, tokens in chosen.items()}
        was_running = {request.request_id for request in scheduler.running}
        self.num_recomputed += len((was_running & peers) - chosen.keys())  # the follower's that go back without KV
        taken = self._dissolve()
        back = [snapshot_of(request, chosen.get(request.request_id, 0)) for request in taken
                if request.request_id in peers]
        # the follower reads layers [split, L) of every copied request before it replays the log (which frees)
        second_half, lost = {}, False
        try:
            self.channel.send_object(("restore", self._runner_log, back, entries))
            for request_id, _, tokens, is_theirs in entries:
                if is_theirs:
                    self.channel.send_stage(KVStage(0, tokens, first_half[request_id]))
        except PeerLost:
            lost = True
        restored = engine.restore_layers(range(num_layers))
        try:
            if not lost:
                second_half = {request_id: self.channel.recv_stage().layers for request_id, _, _, is_theirs in entries
                               if not is_theirs}
        except PeerLost:  # the follower died restoring: this replica's requests recompute, its own went with it
            lost, second_half = True, {}
        for request in taken:
            request_id = request.request_id
            if request_id in peers:
                continue
            carried = None
            if request_id in second_half:
                carried = CarriedKV(chosen[request_id], first_half[request_id] + second_half[request_id])
            if place(scheduler, request, carried):
                self.num_carried += 1
            else:
                self.num_recomputed += request_id in was_running
        self.peer_requests.clear()
        answer = "restored"
        if lost:
            self.num_peer_requests_ended += len(back)
        else:
            answer = self.channel.recv_object()
            self.channel.flush()
        self.channel.close()
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
        self.channel.close()
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
