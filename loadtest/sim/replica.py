"""One simulated replica: a real ElasticPool and KVCacheManager on the `sim` VMM backend, a cost model
for time.

The step loop follows the engine's scheduler: at each step boundary, finished requests free their KV;
decoding requests that reach the end of their last page grow by one page (`kv.grow`), and when that
fails the most recently admitted request is preempted to recompute (`kv.free`, back to the front of the
queue); then, if nothing was preempted, queued requests are admitted in order while their whole prompt
fits (`kv.admit` + `kv.grow`) and a batch seat is free. A step with prompt tokens to compute is a mixed
step (every decode plus prefill chunks up to the token budget); otherwise the replica runs decode-only
steps, and many of them are simulated at once: up to the next step at which some request finishes or
needs a page. Between those the batch is fixed and each step's attended context grows by the batch
size, so the time of m steps has a closed form. An event from outside (a request routed here, a
migration) first brings the replica to the end of the step in progress.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable

import torch

from loadtest.sim.model import BookkeepingLayout, CostModel, ReplicaConfig
from loadtest.sim.policies import ReplicaView, RequestView
from memory import ElasticPool, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, register_layout


class SimRequest:
    __slots__ = ("index", "name", "arrival_s", "prompt", "output", "generated", "first_token_s", "finish_s",
                 "num_preemptions", "num_migrations", "replica", "phase", "capacity", "prefill_left",
                 "prefill_done", "join_step", "join_generated", "version", "outgoing", "admit_seq")

    def __init__(self, index: int, arrival_s: float, prompt: int, output: int) -> None:
        self.index = index
        self.name = f"r{index}"
        self.arrival_s = arrival_s
        self.prompt = prompt
        self.output = output
        self.generated = 0  # output tokens sampled so far (while decoding: as of `join_step`)
        self.first_token_s: float | None = None
        self.finish_s: float | None = None
        self.num_preemptions = 0
        self.num_migrations = 0
        self.replica: SimReplica | None = None
        self.phase = "new"  # new | waiting | prefill | decode | done
        self.capacity = 0  # tokens its KV pages hold on its replica
        self.prefill_left = 0
        self.prefill_done = 0
        self.join_step = 0  # the replica's step count when it started decoding there
        self.join_generated = 0
        self.version = 0  # bumped whenever it stops decoding somewhere: older events about it are stale
        self.outgoing: object | None = None  # the copy migration in flight, if any
        self.admit_seq = 0


class SimReplica:
    def __init__(self, name: str, spec: KVCacheSpec, budget_bytes: int, config: ReplicaConfig, cost: CostModel,
                 on_finish: Callable[[SimRequest], None], now_s: float, state: str = "active",
                 layout: str = BookkeepingLayout.name,
                 on_abandon: Callable[[SimRequest, object], None] = lambda request, copy: None) -> None:
        self.name = name
        self.config = config
        self.cost = cost
        self.on_finish = on_finish
        self.on_abandon = on_abandon  # a request with a copy in flight finished or was preempted here
        self.state = state
        register_layout(BookkeepingLayout)  # (idempotent) so that `layout` may name it
        self.pool = ElasticPool(create_backend("sim"), budget_bytes, spec.page_bytes)
        self.kv = KVCacheManager(spec, self.pool, torch.bfloat16, layout=layout, enable_prefix_caching=False)
        self.tokens_per_page = spec.tokens_per_page
        self.chunks_per_page = 2 * spec.num_layers
        self.waiting: deque[SimRequest] = deque()
        self.running: dict[str, SimRequest] = {}  # admission order: the last one is preempted first
        self.prefilling: list[SimRequest] = []
        self.incoming: dict[str, SimRequest] = {}  # copy migrations holding a reservation here
        self._waiting_chunks = 0
        self.num_decoding = 0
        self.context_sum = 0  # tokens the next decode step attends to, summed over the batch
        self.step = 0
        self.clock = now_s
        self._finishes: list[tuple[int, int, SimRequest, int]] = []  # (step, seq, request, its version)
        self._grows: list[tuple[int, int, SimRequest, int]] = []  # the step at which it needs its next page
        self._seq = 0
        self._admissions = 0
        self._needs_page: list[SimRequest] = []
        self._available: int | None = None  # cached between schedule() calls (every KV change precedes one)
        self._plan: tuple | None = None  # (steps, alpha, beta, prefill chunks or None)
        self.plan_version = 0
        self.num_preemptions = 0
        self.started_s = now_s
        self.released_s: float | None = None

    # ---- queries -------------------------------------------------------------------------------
    def generated(self, request: SimRequest) -> int:
        if request.phase == "decode":
            return request.join_generated + self.step - request.join_step
        return request.generated

    def _chunks_to_start(self, request: SimRequest) -> int:
        return self.kv.chunks_to_grow(None, request.prompt + request.generated)

    def waiting_chunks(self) -> int:
        return self._waiting_chunks

    def headroom(self) -> int:
        """KV chunks left for new work: what the pool can still give minus what the queue is waiting for."""
        return self._available_chunks() - self._waiting_chunks

    def _available_chunks(self) -> int:
        if self._available is None:
            self._available = self.kv.num_available_chunks()
        return self._available

    def is_empty(self) -> bool:
        return not (self.running or self.waiting or self.incoming or self.kv.requests)

    def view(self, with_requests: bool = True) -> ReplicaView:
        """What the controller sees; `with_requests=False` leaves out the movable requests (for
        policies that never migrate)."""
        movable = () if not with_requests else tuple(
            RequestView(r.name, r.prompt + self.generated(r) - 1, self._chunks_held(r))
            for r in self.running.values() if r.phase == "decode" and r.outgoing is None)
        num_outgoing = sum(1 for r in self.running.values() if r.outgoing is not None)
        return ReplicaView(
            self.name, self.state, self.pool.num_chunks, self.kv.num_used_chunks(), self.waiting_chunks(),
            len(self.running) + len(self.incoming), len(self.waiting), self.config.max_num_seqs,
            num_outgoing, len(self.incoming), movable)

    # ---- time ----------------------------------------------------------------------------------
    def sync(self, now_s: float) -> None:
        """Brings the replica to its first step boundary at or after `now_s` (the step in progress ends)."""
        if self._plan is None:
            self.clock = max(self.clock, now_s)
            return
        steps, alpha, beta, chunks = self._plan
        elapsed = now_s - self.clock
        if elapsed > 0:
            done = 1 if chunks is not None else min(steps, _steps_within(alpha, beta, elapsed) + 1)
            self._complete(self._plan, done)
        self._plan = None
        self.plan_version += 1

    def wake(self) -> None:
        """The planned steps have all run."""
        plan, self._plan = self._plan, None
        self._complete(plan, plan[0])

    def _complete(self, plan: tuple, steps: int) -> None:
        _, alpha, beta, chunks = plan
        self.clock += alpha * steps + beta * steps * (steps - 1) / 2
        self.step += steps
        self.context_sum += self.num_decoding * steps
        for request, num_tokens in chunks or ():
            request.prefill_left -= num_tokens
            request.prefill_done += num_tokens
            if request.prefill_left == 0:
                self.prefilling.remove(request)
                request.generated += 1
                if request.first_token_s is None:
                    request.first_token_s = self.clock
                if request.generated >= request.output:
                    self._finish(request)
                else:
                    self._join_decode(request)
        while self._finishes and self._finishes[0][0] <= self.step:
            _, _, request, version = heapq.heappop(self._finishes)
            if self._is_current(request, version):
                self._leave_decode(request)
                self._finish(request)
        while self._grows and self._grows[0][0] <= self.step:
            step, _, request, version = heapq.heappop(self._grows)
            if not self._is_current(request, version):
                continue
            if step == self.step:
                self._needs_page.append(request)  # at this boundary: it may preempt
                continue
            # inside the steps just run, which _replan sized so that these pages are there
            needed = request.prompt + request.join_generated + step - request.join_step
            if not self.kv.grow(request.name, needed):
                raise AssertionError("a page planned to be free was not")
            request.capacity = self._capacity(needed)
            self._push(self._grows, step + request.capacity - needed + 1, request)

    def _is_current(self, request: SimRequest, version: int) -> bool:
        return version == request.version and request.phase == "decode" and request.replica is self

    # ---- scheduling ----------------------------------------------------------------------------
    def schedule(self) -> float | None:
        """Growth, preemption and admission at this boundary; plans the next steps. Returns when they
        end (None when idle)."""
        preempted = self._grow_decodes() if self._needs_page else False
        if not preempted or not self.running:  # the engine admits at the next step; with nothing to run, now
            self._admit()
            preempted = False
        self._available = None
        return self._replan(admit_next_step=preempted and bool(self.waiting))

    def _grow_decodes(self) -> bool:
        preempted = False
        for request in sorted(self._needs_page, key=lambda r: r.admit_seq):
            if request.phase != "decode" or request.replica is not self:
                continue  # preempted for an earlier one in this loop
            needed = request.prompt + self.generated(request)
            while not self.kv.grow(request.name, needed):
                victim = next(reversed(self.running.values()))
                self.preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.phase == "decode":
                request.capacity = self._capacity(needed)
                self._push(self._grows, self.step + request.capacity - needed + 1, request)
        self._needs_page.clear()
        return preempted

    def _admit(self) -> None:
        while self.waiting and self.kv.num_free_slots:
            request = self.waiting[0]
            known = request.prompt + request.generated
            if self.kv.chunks_to_grow(None, known) > self.kv.num_available_chunks():
                return
            self.waiting.popleft()
            self._waiting_chunks -= self._chunks_to_start(request)
            self.kv.admit(request.name, ())
            if not self.kv.grow(request.name, known):
                raise AssertionError("admission checked the pages")
            request.capacity = self._capacity(known)
            request.phase = "prefill"
            request.prefill_left, request.prefill_done = known, 0
            self._admissions += 1
            request.admit_seq = self._admissions
            self.running[request.name] = request
            self.prefilling.append(request)

    def _replan(self, admit_next_step: bool) -> float | None:
        """The next step, or the decode-only steps up to the next one where something must be decided:
        a request finishes, or needs a page the pool may not have (pages that surely fit are mapped at
        their step without stopping: nothing else changes the KV until then, so no admission that failed
        now could succeed in between)."""
        cost = self.cost
        budget = self.config.max_num_batched_tokens - self.num_decoding
        chunks = []
        for request in self.prefilling:
            if budget <= 0:
                break
            num_tokens = min(request.prefill_left, budget)
            chunks.append((request, num_tokens))
            budget -= num_tokens
        if chunks:
            seconds = cost.step_s(self.num_decoding, self.context_sum, [(n, r.prefill_done) for r, n in chunks])
            self._plan = (1, seconds, 0.0, chunks)
        elif self.num_decoding:
            horizon = self.step + 1 if admit_next_step else self._finishes[0][0]
            if self._grows and self._grows[0][0] < horizon:
                # at most one new page per request: a second one is a page of tokens after the first
                horizon = min(horizon, self._grows[0][0] + self.tokens_per_page)
                num_fit = self._available_chunks() // self.chunks_per_page
                if len(self._grows) > num_fit:  # (stale entries count too: that only stops earlier)
                    horizon = min(horizon, heapq.nsmallest(num_fit + 1, self._grows)[-1][0])
            steps = max(1, horizon - self.step)
            alpha = cost.decode_step_s(self.num_decoding, self.context_sum)
            beta = cost.decode_per_context_token_s * self.num_decoding
            self._plan = (steps, alpha, beta, None)
        else:
            return None
        steps, alpha, beta, _ = self._plan
        return self.clock + alpha * steps + beta * steps * (steps - 1) / 2

    # ---- request moves -------------------------------------------------------------------------
    def enqueue(self, request: SimRequest, front: bool = False) -> None:
        request.replica = self
        request.phase = "waiting"
        self._waiting_chunks += self._chunks_to_start(request)
        if front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def take_waiting(self) -> list[SimRequest]:
        """Empties the queue (requests there hold no KV) so they can be routed elsewhere."""
        taken = list(self.waiting)
        self.waiting.clear()
        self._waiting_chunks = 0
        for request in taken:
            request.replica = None
        return taken

    def preempt(self, request: SimRequest) -> None:
        """Preemption by recompute: the request keeps its tokens, loses its KV, and queues first."""
        self._drop(request)
        self.enqueue(request, front=True)
        request.num_preemptions += 1
        self.num_preemptions += 1

    def detach(self, request: SimRequest) -> None:
        """The request leaves this replica (migration): its KV is freed here."""
        self._drop(request)
        request.replica = None

    def reserve_import(self, request: SimRequest, num_tokens: int) -> bool:
        if not self.kv.reserve_import(request.name, num_tokens):
            return False
        self.incoming[request.name] = request
        return True

    def cancel_import(self, request: SimRequest) -> None:
        """Frees a reservation; callable between boundaries (the plan only gets more room)."""
        del self.incoming[request.name]
        self.kv.free(request.name)
        self._available = None

    def attach(self, request: SimRequest, num_kv_tokens: int) -> bool:
        """A copied request starts decoding here. False: its KV did not fit after all; it queues to
        recompute instead."""
        del self.incoming[request.name]
        self.kv.finish_import(request.name, num_kv_tokens)
        request.replica = self
        known = request.prompt + request.generated
        if not self.kv.grow(request.name, known):
            self.kv.free(request.name)
            self.enqueue(request, front=True)
            return False
        request.capacity = self._capacity(known)
        self._admissions += 1
        request.admit_seq = self._admissions
        self.running[request.name] = request
        self._join_decode(request)
        return True

    def release(self, now_s: float) -> None:
        if not self.is_empty() or self.pool.num_held("kv"):
            raise AssertionError(f"replica {self.name} released while holding work")
        self.released_s = max(now_s, self.clock)
        self.kv.close()
        self.pool.close()

    # ---- internals -----------------------------------------------------------------------------
    def _chunks_held(self, request: SimRequest) -> int:
        return request.capacity // self.tokens_per_page * self.chunks_per_page

    def _capacity(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_page) * self.tokens_per_page

    def _push(self, events: list, step: int, request: SimRequest) -> None:
        self._seq += 1
        heapq.heappush(events, (step, self._seq, request, request.version))

    def _join_decode(self, request: SimRequest) -> None:
        request.phase = "decode"
        request.join_step, request.join_generated = self.step, request.generated
        known = request.prompt + request.generated
        self.num_decoding += 1
        self.context_sum += known
        self._push(self._finishes, self.step + request.output - request.generated, request)
        self._push(self._grows, self.step + max(0, request.capacity - known + 1), request)

    def _leave_decode(self, request: SimRequest) -> None:
        request.generated = self.generated(request)
        self.num_decoding -= 1
        self.context_sum -= request.prompt + request.generated
        request.version += 1

    def _drop(self, request: SimRequest) -> None:
        if request.phase == "decode":
            self._leave_decode(request)
        elif request.phase == "prefill":
            self.prefilling.remove(request)
        del self.running[request.name]
        self.kv.free(request.name)
        self._abandon_copy(request)
        request.capacity = 0

    def _abandon_copy(self, request: SimRequest) -> None:
        if request.outgoing is not None:
            copy, request.outgoing = request.outgoing, None
            self.on_abandon(request, copy)

    def _finish(self, request: SimRequest) -> None:
        del self.running[request.name]
        self.kv.free(request.name)
        self._abandon_copy(request)
        request.phase = "done"
        request.finish_s = self.clock
        request.replica = None
        self.on_finish(request)


def _steps_within(alpha: float, beta: float, seconds: float) -> int:
    """How many whole steps (step i lasting alpha + beta * i) fit in `seconds`."""
    if beta <= 0:
        steps = int(seconds / alpha)
    else:
        half = alpha - beta / 2
        steps = int((-half + math.sqrt(half * half + 2 * beta * seconds)) / beta)
    steps = max(0, steps)
    while alpha * (steps + 1) + beta * (steps + 1) * steps / 2 <= seconds:
        steps += 1
    while steps > 0 and alpha * steps + beta * steps * (steps - 1) / 2 > seconds:
        steps -= 1
    return steps
