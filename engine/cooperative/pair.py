"""A cooperative pair (KunServe): two engines of one model that dropped complementary layers and serve
all their requests as one two-stage pipeline until the spike passes.

`drop(first_keeps, second_from)`: the first engine keeps layers [0, first_keeps), the second keeps
[second_from, num_layers); every layer stays on at least one (second_from <= first_keeps), so together
they hold a full copy. Layers in the overlap stay on both (dropping only what the demand needs); the
pipeline cuts at the middle of the overlap closest to half the layers. Each engine's weights balloon
shrinks at once and its KV may take the chunks in the very next step.

While dropped, the first engine's scheduler plans for both: its KV manager becomes a PipelineKV over
the two engines' managers (each holding its layers' KV) and its runner a PipelineRunner. Requests keep
a home (the engine they were added to), and `step()` returns each output with its home, so a replica
keeps streaming to the client that connected to it.

Forming and dissolving the pipeline carries the requests in flight (carry.py): each keeps its KV, read
per layer from the replica holding the layer and imported where the layer's KV lives next, or recomputes
it, as `CarryPolicy` decides from a cost model; their tokens so far are kept, so none is lost or repeated.

`peer_lost(dead)`: the survivor restores its own dropped layers from its host copy and serves alone;
requests whose home was the dead replica end with finish_reason "error".
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from engine.api import RequestOutput
from engine.cooperative.carry import CarriedKV, CarryPolicy, KVLayers, place, snapshot
from engine.cooperative.kv import PipelineKV
from engine.cooperative.pipeline import MicroBatchCut, PipelineRunner, PipelineStats, grown_layers, pipeline_split
from engine.cooperative.transport import HiddenTransport
from engine.core.engine import LLMEngine
from engine.core.request import Request, RequestStatus


class PairState(enum.Enum):
    NORMAL = "normal"
    DROPPED = "dropped"


@dataclass(frozen=True)
class HomedOutput:
    home: LLMEngine
    output: RequestOutput


class CooperativePair:
    def __init__(self, first: LLMEngine, second: LLMEngine, num_micro_batches: int = 2,
                 carry: CarryPolicy | None = None, min_micro_batch_tokens: int = 64, min_decode_rows: int = 0):
        if first.model_config != second.model_config:
            raise ValueError("a cooperative pair needs two replicas of one model")
        self.first = first
        self.second = second
        self.num_layers = first.model_config.num_layers
        self.cut = MicroBatchCut(num_micro_batches, min_micro_batch_tokens, min_decode_rows)
        self.state = PairState.NORMAL
        self.split = self.num_layers
        self.kept = (self.num_layers, 0)  # (first_keeps, second_from)
        self.homes: dict[str, LLMEngine] = {}  # while dropped: request id -> the engine it came in on
        self._runner: PipelineRunner | None = None
        self._saved = None  # the first engine's own (kv, runner, activation charge) while dropped
        self.stats = PipelineStats()  # summed over every dropped period
        self.carry = carry or CarryPolicy()
        self.num_carried = 0  # requests that kept their KV across a drop or restore
        self.num_recomputed = 0  # requests that recomputed it
        spec = first.kv_spec
        self._layer_bytes_per_token = 2 * spec.bytes_per_token  # K and V of one layer
        self._was_running: set[str] = set()  # while carrying: requests that had KV before the change

    # ---- forming the pipeline -------------------------------------------------------------------
    def drop(self, first_keeps: int, second_from: int, transport: HiddenTransport | None = None) -> int:
        """Drops [first_keeps, L) on the first engine and [0, second_from) on the second and starts
        serving every request of both on the pipeline. Returns the chunks freed on both."""
        if self.state is not PairState.NORMAL:
            raise RuntimeError(f"the pair is {self.state.value}")
        split = pipeline_split(self.num_layers, first_keeps, second_from)
        for engine in (self.first, self.second):  # checked before anything changes
            if any(request.status is RequestStatus.PAUSED for request in engine.scheduler.requests.values()):
                raise RuntimeError("a request is being migrated; finish or abort the migration first")
        self._set_state("dropping")
        carried = {}
        taken = []
        for engine in (self.first, self.second):
            self._was_running.update(request.request_id for request in engine.scheduler.running)
            moved = self.num_layers - split if engine is self.first else split  # its KV that changes replica
            carried.update(snapshot(engine.scheduler, lambda rid, n, kv=engine.kv: kv.read_kv(rid, 0, n),
                                    self.carry, self._layer_bytes_per_token, lambda _, moved=moved: moved))
            taken += [(engine, request) for request in engine.scheduler.take_all_for_recompute()]
        freed = self.first.drop_layers(range(first_keeps, self.num_layers))
        freed += self.second.drop_layers(range(0, second_from))
        self.first.kv.hold_layers(range(0, split))
        self.second.kv.hold_layers(range(split, self.num_layers))
        scheduler = self.first.scheduler
        self._saved = (scheduler.kv, self.first.runner, scheduler.activation_chunks)
        self._runner = PipelineRunner(self.first.runner, self.second.runner, split, self.first.sampler, transport,
                                      self.cut)
        scheduler.kv = PipelineKV([self.first.kv, self.second.kv])
        scheduler.activation_chunks = self._runner.activation_chunks_charged_to_kv
        self.first.runner = self._runner
        self.split = split
        self.kept = (first_keeps, second_from)
        self.state = PairState.DROPPED
        for home, request in sorted(taken, key=lambda pair: pair[1].arrival_time):
            self._place(self.first, request, home, carried)
        self._set_state("dropped")
        return freed

    def grow(self, first_keeps: int, second_from: int) -> int:
        """Drops more while dropped (the drop plan's `grows`): the first engine then keeps [0, first_keeps),
        the second [second_from, L). The cut stays, so neither drops a layer it runs: requests go on
        untouched and the chunks freed are KV's in the next step. Returns them."""
        if self.state is not PairState.DROPPED:
            raise RuntimeError(f"the pair is {self.state.value}")
        first, second = grown_layers(self.num_layers, self.split, self.kept, (first_keeps, second_from))
        freed = self.first.drop_layers(first) + self.second.drop_layers(second)
        self.kept = (first_keeps, second_from)
        return freed

    def add_request(self, request, home: LLMEngine) -> None:
        """A request that arrived on `home` (either engine); while dropped it runs on the pipeline."""
        if self.state is PairState.NORMAL:
            home.add_request(request)
            return
        self.first.add_request(request)
        self.homes[request.request_id] = home

    def step(self) -> list[HomedOutput]:
        """One step of each engine (NORMAL) or of the pipeline (DROPPED); outputs with their homes."""
        if self.state is PairState.NORMAL:
            return [HomedOutput(engine, output) for engine in (self.first, self.second) for output in engine.step()]
        outputs = [HomedOutput(self.homes[output.request_id], output) for output in self.first.step()]
        for engine in (self.first, self.second):
            engine.pipeline_bubble_ratio = self._runner.stats.bubble_ratio
        for item in outputs:
            if item.output.is_finished:
                del self.homes[item.output.request_id]
        return outputs

    def abort(self, request_id: str, home: LLMEngine) -> RequestOutput | None:
        engine = self.first if self.state is PairState.DROPPED else home
        self.homes.pop(request_id, None)
        return engine.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.first.has_work or self.second.has_work

    # ---- dissolving it ----------------------------------------------------------------------------
    def restore(self) -> int:
        """Both engines copy their dropped layers back and serve alone again; every request goes on at
        its home. Returns the chunks the weights took back."""
        if self.state is not PairState.DROPPED:
            raise RuntimeError("the pair is not dropped")
        self._set_state("restoring")
        taken, carried = self._dissolve()
        restored = self.first.restore_layers(range(self.num_layers))
        restored += self.second.restore_layers(range(self.num_layers))
        for request in taken:
            home = self.homes.pop(request.request_id)
            self._place(home, request, home, carried)
        self._set_state("normal")
        return restored

    def peer_lost(self, dead: LLMEngine) -> list[RequestOutput]:
        """The other engine goes on alone: it restores its own layers from its host copy; requests
        whose home was `dead` end with an error (returned, for their streams)."""
        if self.state is not PairState.DROPPED:
            raise RuntimeError("the pair is not dropped")
        survivor = self.second if dead is self.first else self.first
        taken, _ = self._dissolve(read_kv=False)  # half of every request's KV was on the dead replica
        survivor.restore_layers(range(self.num_layers))
        survivor.drop_state = "normal"
        ended = []
        for request in taken:
            home = self.homes.pop(request.request_id)
            if home is survivor:
                self._place(survivor, request, survivor, {})
            else:
                request.status = RequestStatus.FINISHED
                ended.append(RequestOutput(
                    request.request_id, (), "", "error", len(request.prompt_token_ids), len(request.output_token_ids),
                    error="the replica serving the other half of this request's layers failed"))
        return ended

    def _dissolve(self, read_kv: bool = True) -> tuple[list[Request], dict[str, CarriedKV]]:
        scheduler = self.first.scheduler
        carried = snapshot(scheduler, self._read_pipeline_kv, self.carry, self._layer_bytes_per_token,
                           self._moved_home) if read_kv else {}
        self._was_running.update(request.request_id for request in scheduler.running)
        taken = scheduler.take_all_for_recompute()
        self.stats.add(self._runner.stats)
        self._runner.close()
        scheduler.kv, self.first.runner, scheduler.activation_chunks = self._saved
        self._runner = self._saved = None
        for engine in (self.first, self.second):
            engine.kv.hold_layers(range(self.num_layers))
        self.split = self.num_layers
        self.kept = (self.num_layers, 0)
        self.state = PairState.NORMAL
        return taken, carried

    def _set_state(self, state: str) -> None:
        for engine in (self.first, self.second):
            engine.drop_state = state

    def _moved_home(self, request: Request) -> int:
        """How many layers of a request's KV change replica when it goes home."""
        return self.num_layers - self.split if self.homes[request.request_id] is self.first else self.split

    def _read_pipeline_kv(self, request_id: str, num_tokens: int) -> KVLayers:
        """Each layer's KV from the stage that holds it."""
        first = self.first.kv.read_kv(request_id, 0, num_tokens)
        second = self.second.kv.read_kv(request_id, 0, num_tokens)
        return first[:self.split] + second[self.split:]

    def _place(self, engine: LLMEngine, request: Request, home: LLMEngine, carried: dict[str, CarriedKV]) -> None:
        if self.state is PairState.DROPPED:
            self.homes[request.request_id] = home
        if place(engine.scheduler, request, carried.get(request.request_id)):
            self.num_carried += 1
        elif request.request_id in self._was_running:
            self.num_recomputed += 1
        self._was_running.discard(request.request_id)

    @property
    def bubble_ratio(self) -> float:
        if self._runner is None:
            return self.stats.bubble_ratio
        live = PipelineStats()
        live.add(self.stats)
        live.add(self._runner.stats)
        return live.bubble_ratio
