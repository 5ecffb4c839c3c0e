"""Continuous batching with chunked prefill, SLO-aware admission and preemption by swap or recompute.

Each step the scheduler decides, in this order: decodes of running requests (growing their KV one
token, preempting the most recent request when memory runs out), the rest of partly prefilled
requests, swapped requests coming back, then new requests from the waiting queue while the token
budget, the KV slots and the memory left after the step's activation workspace allow. It never
drops a request: preempted ones are swapped to the host buffer or put back in front to recompute.
Whoever wants to watch the plans (the offline benchmark) appends a callback to `plan_observers`: each
gets every plan right after it is made, before the step runs.

Preemption and the swapped requests' return are engine/core/preemption.py (`Preemption`); the forks of a
prompt's choices (n > 1) are engine/core/forks.py (`ForkScheduling`); both are mixed in here. Every path that
puts KV into the step (running, swapped, waiting, forks) measures room with one rule, `_room`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence

from engine.core.arbiter_view import swap_candidates, urgent_prompt
from engine.core.chunk_policy import ChunkPolicy, FixedChunkPolicy, StepMemory
from engine.core.forks import ForkScheduling, PromptForks
from engine.core.memory_arbiter import ArbiterView, MemoryArbiter
from engine.core.offload_policy import OFFLOAD_POLICIES
from engine.core.preemption import Preemption
from engine.core.request import Request, RequestStatus
from engine.core.sampling_workspace import NO_ROWS, SampledRows
from engine.core.scheduler_plan import ScheduledChunk, SchedulerConfig, SchedulerOutput, StepBuilder
from engine.core.slo import SloAttainment, SloTargets
from engine.core.step_cost import StepCostModel
from memory.kv import KVBlock, KVCacheManager

__all__ = ["ScheduledChunk", "Scheduler", "SchedulerConfig", "SchedulerOutput", "StepBuilder"]


class Scheduler(Preemption, ForkScheduling):
    def __init__(
        self,
        config: SchedulerConfig,
        kv: KVCacheManager,
        activation_chunks: Callable[[int, SampledRows], int],  # (num_tokens, sampled rows) -> chunks KV must leave free
        cost_model: StepCostModel | None = None,
        chunk_policy: ChunkPolicy | None = None,  # the step's token budget (default: max_num_batched_tokens)
        clock: Callable[[], float] = time.monotonic,  # request times' clock (the simulator's is virtual)
    ):
        self.config = config
        self.clock = clock
        self.chunk_policy = chunk_policy or FixedChunkPolicy(config.max_num_batched_tokens)
        self.kv = kv
        self.activation_chunks = activation_chunks
        self.cost_model = cost_model or StepCostModel()
        self.arbiter = MemoryArbiter(self.chunk_policy, self.cost_model.predict_ms, config.memory_arbiter)
        self.slo = SloTargets(config.ttft_slo_ms, config.tpot_slo_ms, config.priority_scale, clock)
        self.offload = OFFLOAD_POLICIES[config.kv_offload](kv, self.slo, self.cost_model, config.tpot_margin)
        self.attainment = SloAttainment()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # admission order: the last one is preempted first
        self.swapped: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.forks = PromptForks()  # the choices of one prompt waiting for their leader's prefill
        self.num_preemptions = 0
        self.num_swaps = 0
        self.num_recomputes = 0
        self.plan_observers: list[Callable[[SchedulerOutput], None]] = []
        self._deferred: set[str] = set()  # decodes sitting this step out (offloaded layers, TPOT target)

    # ---- queue -------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if self.forks.join(request):  # another choice of its prompt leads the prefill
            request.status = RequestStatus.FOLLOWING
            return
        # priority order (stable): a request goes behind every waiting one at least as urgent
        index = len(self.waiting)
        while index > 0 and self.waiting[index - 1].priority > request.priority:
            index -= 1
        self.waiting.insert(index, request)

    def finish(self, request: Request, reason: str) -> None:
        """Ends a request (finished or aborted) and frees all it holds."""
        if request.is_finished:
            return
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
            self.kv.free(request.request_id)
        elif request.status is RequestStatus.PAUSED:
            self.kv.free(request.request_id)
        elif request.status is RequestStatus.SWAPPED:
            self.swapped.remove(request)
            self.kv.free(request.request_id)
        elif request.status is RequestStatus.FOLLOWING:
            self.forks.leave(request)
        else:
            self.waiting.remove(request)
        followers = self.forks.close(request)
        if followers:  # it ended before its first token: its first follower leads the others
            followers[0].status = RequestStatus.WAITING
            self.waiting.appendleft(followers[0])
            for follower in followers:
                self.forks.join(follower)
        if reason != "abort":
            self.attainment.record(self.slo.attained(request, self.clock()))
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        del self.requests[request.request_id]

    def pause(self, request: Request) -> None:
        """Stops scheduling a running request; it keeps its KV (a migration is copying it)."""
        self.running.remove(request)
        request.status = RequestStatus.PAUSED

    def resume(self, request: Request) -> None:
        """A paused request goes on here (its migration was aborted)."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def attach(self, request: Request) -> None:
        """Adds a request whose KV is already in the cache (imported from another replica)."""
        self.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    def take_all_for_recompute(self) -> list[Request]:
        """Frees every request's KV and hands the requests over, oldest first, each to recompute its KV
        wherever it is added next (a cooperative pipeline forms or dissolves). Outputs so far are kept."""
        if any(request.status is RequestStatus.PAUSED for request in self.requests.values()):
            raise RuntimeError("a request is being migrated; finish or abort the migration first")
        taken = sorted(self.requests.values(), key=lambda request: request.arrival_time)
        for request in taken:
            if request.status in (RequestStatus.RUNNING, RequestStatus.SWAPPED):
                self.kv.free(request.request_id)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
        self.forks.clear()
        self.waiting.clear()
        self.running.clear()
        self.swapped.clear()
        self.requests.clear()
        return taken

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    # ---- planning ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        self._deferred = self._decodes_to_defer()
        step = StepBuilder(0)
        step.token_budget = self._token_budget(step)
        self._promote_offloaded(step)
        self._schedule_running(step)
        if not step.preempted:
            self._schedule_swapped(step)
        if not step.preempted and not self.swapped:
            self._schedule_waiting(step)
        output = self._output(step)
        for observer in self.plan_observers:
            observer(output)
        return output

    def _decodes_to_defer(self) -> set[str]:
        """With a TPOT target: decodes whose fetches of host pages would slow the step and that can still meet
        their target later sit this step out (engine/core/offload_policy.py)."""
        if self.config.tpot_slo_ms is None or not self.running:
            return set()
        return self.offload.decodes_to_defer(self.running, self.cost_model.predict_ms(len(self.running)))

    def _token_budget(self, step: StepBuilder | None = None) -> int:
        """Tokens this step may compute: the memory arbiter's decision (engine/core/memory_arbiter.py) over
        the chunk policy's budget and the SLO cap; the victims it names are swapped out first."""
        step = step or StepBuilder(0)
        memory = self._step_memory()
        budget = self.chunk_policy.token_budget(memory)
        cap = self._slo_cap(budget)
        prompt = urgent_prompt(self.running, self.slo, self.clock()) if self.arbiter.mode == "slo" else None
        victims = () if prompt is None or self.config.preemption_mode == "recompute" else \
            swap_candidates(self.running, prompt, self.kv, self.slo, self.cost_model)
        decodes = sum(1 for r in self.running if not r.is_prefilling and r.request_id not in self._deferred)
        decision = self.arbiter.decide(ArbiterView(memory, budget, cap, prompt, victims, decodes))
        if not decision.victims:
            return decision.budget
        for request_id in decision.victims:
            self._preempt(self.requests[request_id], step)
        # the freed chunks were an estimate: never plan a budget the pool cannot now pay for
        memory = self._step_memory()
        if self.chunk_policy.fits(decision.budget, memory):
            return decision.budget
        fits = self.chunk_policy.fitting_budget(memory)
        return fits if cap is None else max(1, min(fits, cap))

    def _slo_cap(self, budget: int) -> int | None:
        """With a TPOT target, prefill tokens are capped so the step stays within `tpot_margin` x it (every
        decoding request waits for the step); with a TTFT target, a prompt without its first token (waiting, or
        admitted and still prefilling) about to miss it, and not past it yet, lifts the cap so its prefill goes
        through (TTFT before TPOT, as LayerKV argues; a TTFT already lost is not worth the running requests'
        TPOT). None: no cap."""
        if self.config.tpot_slo_ms is None or not self.running:
            return None
        # offloaded layers' fetches run one layer ahead of compute: the step takes about the longer of the two
        # (a prefill chunk's own fetches are not counted: they shrink per token as its chunk grows)
        decoding = [r for r in self.running if r.request_id not in self._deferred and not r.is_prefilling]
        target_ms = self.config.tpot_margin * self.config.tpot_slo_ms
        fetch_ms = self.cost_model.fetch_ms(self.offload.fetch_bytes(decoding))
        within = self.cost_model.max_tokens_within(target_ms) if fetch_ms < target_ms else 1
        prompts = [r for r in self.running if r.first_token_time is None] + list(self.waiting)[:1]
        if self.config.ttft_slo_ms is not None and prompts:
            oldest = min(prompts, key=lambda request: request.arrival_time)
            waited_ms = (self.clock() - oldest.arrival_time) * 1e3
            left = oldest.num_tokens - oldest.num_computed_tokens
            target = self.slo.ttft_target_ms(oldest)
            if waited_ms < target <= waited_ms + self.cost_model.predict_ms(min(left, budget)):
                return None
        return max(len(decoding) + 1, within)

    def _step_memory(self) -> StepMemory:
        next_kv = sum(self.kv.chunks_to_grow(r.request_id, r.num_computed_tokens + 1) for r in self.running)
        return StepMemory(self.kv.num_available_chunks(), next_kv, len(self.running), self._full_step_rows())

    def _full_step_rows(self) -> SampledRows:
        """The sampled rows of a step in which every running request samples, and one more (plain) row."""
        return SampledRows.of(r.row_demand() for r in [*self.running, *self.forks.all_followers()]) + \
            SampledRows.plain(1)

    def _fits(self, step: StepBuilder, request_id: str | None, num_tokens: int, new_tokens: int,
              sampled: SampledRows) -> bool:
        """Whether growing `request_id` to `num_tokens` leaves room for the step's activations
        (and the staging buffer its offloaded layers need)."""
        return self._shortfall(step, request_id, num_tokens, new_tokens, sampled) <= 0

    def _shortfall(self, step: StepBuilder, request_id: str, num_tokens: int, new_tokens: int,
                   sampled: SampledRows) -> int:
        return self.kv.chunks_to_grow(request_id, num_tokens) - \
            self._room(step, new_tokens, sampled, spans={**step.spans, request_id: num_tokens})

    def _room(self, step: StepBuilder, new_tokens: int, sampled: SampledRows, next_pages: int = 0,
              holding: Sequence[KVBlock] = (), spans: dict[str, int] | None = None) -> int:
        """The one admission rule (running, swapped, waiting, forks): chunks left for a request's KV once the
        step's other claims are met: the running requests' `next_pages`, the step's activation workspace with
        `new_tokens` more tokens and `sampled` more rows, the staging of offloaded layers the step computing
        `spans` needs (default: the step's spans), the chunks of the step's forks. `holding`: the cached
        blocks a prefix hit pins (counted in the request's KV as already there: not room as well)."""
        workspace = self.activation_chunks(step.num_tokens + new_tokens, step.rows + sampled)
        staging = self.offload.staging(step.spans if spans is None else spans)
        return self.kv.num_available_chunks(holding) - next_pages - workspace - staging - \
            sum(step.fork_chunks.values())

    def _next_pages(self) -> int:
        """Chunks the running requests' pages up to their next token take (each will take one more token)."""
        return sum(self.kv.chunks_to_grow(r.request_id, r.num_computed_tokens + 2) for r in self.running)

    def _promote_offloaded(self, step: StepBuilder) -> None:
        """Memory freed: offloaded layers come back (the offload policy says whose, in what order),
        keeping room for a full step's activations, every running request's next page and every prompt's
        next chunk (what promotion took, a prefill would otherwise demote again at once)."""
        ends = {r.request_id: min(r.num_tokens, r.num_computed_tokens + (step.token_budget if r.is_prefilling else 2))
                for r in self.running}

        def spare() -> int:
            reserve = self.activation_chunks(step.token_budget, self._full_step_rows())
            reserve += sum(self.kv.chunks_to_grow(request_id, end) for request_id, end in ends.items())
            # the step's staging buffer for what stays offloaded (as if nothing were promoted: an upper bound)
            reserve += self.offload.staging({request_id: end for request_id, end in ends.items()
                                             if request_id not in self._deferred})
            return self.kv.num_available_chunks() - reserve

        # what the waiting head needs to start with all its layers on the host stays free (no promotion that
        # the admission below would demote again)
        head_reserve = 0
        if self.waiting:
            head = self.waiting[0]
            head_reserve = self.offload.admission_reserve(0, min(head.num_tokens, step.token_budget))
        if self.running:
            self.offload.promote(self.running, lambda: spare() - head_reserve, self._deferred)
            # a parked request made whole decodes this step
            self._deferred = {request_id for request_id in self._deferred if self.kv.has_host_pages(request_id)}

    def _schedule_running(self, step: StepBuilder) -> None:
        index = 0
        while index < len(self.running):
            request = self.running[index]
            if step.num_tokens >= step.token_budget:
                break
            if request.request_id in self._deferred:  # its fetches do not fit this step's TPOT target
                index += 1
                continue
            if request.hold_at is not None and request.num_tokens >= request.hold_at and not request.is_prefilling:
                index += 1  # held at its migration's reservation until it is paused (or the hold is lifted)
                continue
            if request.is_prefilling:
                num_new = min(request.num_tokens - request.num_computed_tokens, step.token_budget - step.num_tokens)
            else:
                num_new = 1
            end = request.num_computed_tokens + num_new
            samples = request.row_demand() if end == request.num_tokens else NO_ROWS
            while not self._fits(step, request.request_id, end, num_new, samples):
                # layers go to the host before anyone is preempted: parked decodes' first, then a prompt's own,
                # then those of the requests with the most TPOT slack (a whole decode demoted fetches every
                # step, or parks and is made whole again with others' layers: the memory would go round)
                shortfall = self._shortfall(step, request.request_id, end, num_new, samples)
                parked = [r for r in self.running if r.request_id in self._deferred and r is not request]
                own = [request] if request.is_prefilling else []
                if any(self.offload.demote(shortfall, candidates) for candidates in (parked, own, self.running)):
                    continue
                victim = self.running[-1]
                self._preempt(victim, step)
                if victim is request:
                    break
            if request.status is not RequestStatus.RUNNING:
                break  # the request preempted itself: everything after it is gone too
            self._grow(request, end)
            step.add(request, num_new, samples)
            index += 1
            if samples.num_rows:
                self._plan_forks(step, request, end)

    def _schedule_waiting(self, step: StepBuilder) -> None:
        next_pages = self._next_pages()  # spoken for before anyone is admitted
        while self.waiting and len(self.running) + step.num_forks < self.config.max_num_seqs and \
                self.kv.num_free_slots > step.num_forks:
            budget_left = step.token_budget - step.num_tokens
            if budget_left <= 0:
                return
            request = self.waiting[0]
            token_ids = request.all_token_ids
            num_cached = self.kv.match_prefix(token_ids)
            num_new = min(request.num_tokens - num_cached, budget_left)
            samples = request.row_demand() if num_cached + num_new == request.num_tokens else NO_ROWS
            # admit only if the whole prompt's KV fits (growing chunk by chunk would just preempt)
            need = self.kv.chunks_to_grow(None, request.num_tokens + 1) - self._cached_chunks(num_cached)
            available = self._room(step, num_new, samples, next_pages, self.kv.hit_blocks(token_ids, num_cached))
            # () when the whole prompt fits; layer-wise: the top layers to keep on the host; None: wait
            offloaded = self.offload.layers_to_offload(request, num_cached, num_cached + num_new, need, available,
                                                       self.running)
            if offloaded is None and self.offload.make_room(request, num_cached, num_cached + num_new, available,
                                                            self.running, self._deferred):
                continue  # decodes gave layers to the host (the offload policy says whose)
            if offloaded is None:
                return
            self.waiting.popleft()
            if offloaded:  # with some layers on the host
                request.num_cached_tokens = self.kv.admit(request.request_id, token_ids, offloaded)
            else:
                request.num_cached_tokens = self.kv.admit(request.request_id, token_ids)
            request.num_computed_tokens = request.num_cached_tokens
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:  # its queue time ends (a preempted one keeps the first)
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            end = request.num_computed_tokens + num_new
            self._grow(request, end)
            step.add(request, num_new, samples)
            if samples.num_rows:
                self._plan_forks(step, request, end)

    def _grow(self, request: Request, num_tokens: int) -> None:
        """Every caller checked first that the chunks are there (`_fits` or the admission check), so a
        refusal means the accounting and the pool disagree: stop rather than run a step without KV pages."""
        if not self.kv.grow(request.request_id, num_tokens):
            raise RuntimeError(f"KV for {request.request_id} up to {num_tokens} tokens was checked to fit and "
                               f"did not ({self.kv.num_available_chunks()} chunks available)")

    def _cached_chunks(self, num_cached_tokens: int) -> int:
        return self.kv.chunks_to_grow(None, num_cached_tokens) if num_cached_tokens else 0

    def _output(self, step: StepBuilder) -> SchedulerOutput:
        decodes = []
        for request_id in step.decode_ids:
            request = self.requests[request_id]
            position = request.num_computed_tokens
            token = request.token_at(position)
            decodes.append(ScheduledChunk(request_id, self.kv.slot_of(request_id), position, (token,), True))
        decodes.sort(key=lambda chunk: chunk.slot)
        prefills = []
        for request_id, start, num_new in step.prefill_plan:
            request = self.requests[request_id]
            tokens = tuple(request.tokens[start : start + num_new])
            samples = start + num_new == request.num_tokens
            prefills.append(ScheduledChunk(request_id, self.kv.slot_of(request_id), start, tokens, samples))
        return SchedulerOutput(
            decodes=tuple(decodes),
            prefills=tuple(prefills),
            preempted=tuple(step.preempted),
            num_activation_chunks=self.activation_chunks(step.num_tokens, step.rows),
            sampled_rows=step.rows,
            forks=tuple((leader, tuple(followers)) for leader, followers in step.forks.items()),
        )

    # ---- after the step ------------------------------------------------------------------------
    def mark_computed(self, output: SchedulerOutput) -> None:
        """The step ran: its tokens' K/V are stored; full pages become shareable."""
        for chunk in output.decodes + output.prefills:
            request = self.requests.get(chunk.request_id)
            if request is None:
                continue
            request.num_computed_tokens = chunk.start + len(chunk.token_ids)
            self.kv.commit(chunk.request_id, request.tokens, request.num_computed_tokens)
        for leader_id, follower_ids in output.forks:
            self._fork(leader_id, follower_ids)
