"""Preemption: a running request losing its KV slot (swapped to the host buffer, else recomputed later), and
swapped requests coming back.

`Preemption` is mixed into `Scheduler` (engine/core/scheduler.py). It uses the scheduler's `config`, `kv`,
`running`, `waiting`, `swapped`, `requests` and `forks`, and its step helpers `_room` (the one admission
rule: chunks left for a request's KV beside the step's other claims), `_next_pages`, `_fits`, `_grow` and
`_plan_forks` (engine/core/forks.py); it counts `num_preemptions`, `num_swaps` and `num_recomputes`, which
the scheduler starts at 0. Contract:
- a preempted request leaves `running` and everything the step being built planned for it (its tokens, its
  sampled row, its forks: their followers follow it again); it is never dropped: swapped, it goes to the
  front of `swapped`; recomputed (its KV freed, `num_computed_tokens` 0), to the front of `waiting`; its id is
  in the step's `preempted`.
- a swapped request comes back only when the KV to finish its prompt and take its next token fits (beside
  the running requests' next pages, the step's workspace and forks); one that does not fit waits without
  blocking those behind it.
"""

from __future__ import annotations

from engine.core.request import Request, RequestStatus
from engine.core.scheduler_plan import StepBuilder


class Preemption:
    def _preempt(self, request: Request, step: StepBuilder) -> None:
        """Takes the request's KV slot away without losing it: swap to host, else recompute later."""
        self.running.remove(request)
        for follower_id in step.remove(request.request_id):  # it samples later: they follow it again
            self.forks.rejoin(request, self.requests[follower_id])
        mode = self.config.preemption_mode
        can_swap = mode != "recompute" and self.kv.can_swap_out(request.request_id)
        if mode == "swap" and not can_swap:
            mode = "recompute"  # the host buffer is full: recompute rather than lose the request
        if can_swap:
            self.kv.swap_out(request.request_id)
            request.status = RequestStatus.SWAPPED
            self.swapped.appendleft(request)
            self.num_swaps += 1
        else:
            self.kv.free(request.request_id)
            request.num_computed_tokens = 0
            request.status = RequestStatus.WAITING
            self.waiting.appendleft(request)
            self.num_recomputes += 1
        request.num_preemptions += 1
        self.num_preemptions += 1
        step.preempted.append(request.request_id)

    def _schedule_swapped(self, step: StepBuilder) -> None:
        """Swapped requests come back in order, each only if the KV it needs to finish its prompt and take its
        next token fits beside the running requests' next pages (admission's rule): one that does not stays on
        the host without blocking those behind it (a prompt the pool cannot hold now would only preempt itself
        again, swapping in and out forever). New requests wait while anyone is swapped, so room comes."""
        next_pages = self._next_pages()
        for request in list(self.swapped):
            if len(self.running) >= self.config.max_num_seqs or not self.kv.num_free_slots or \
                    step.num_tokens >= step.token_budget:
                return
            # its pages back, and the pages up to its next token beyond what it holds
            need = self.kv.chunks_to_swap_in(request.request_id) + \
                self.kv.chunks_to_grow(None, request.num_tokens + 1) - \
                self.kv.chunks_to_grow(None, request.num_computed_tokens)
            row = request.row_demand()
            # (this check has never counted the staging of the step's offloaded layers: `_fits` below does)
            if need > self._room(step, 1, row, next_pages=next_pages, spans={}):
                continue
            end = request.num_computed_tokens + 1
            if not self.kv.swap_in(request.request_id):
                return
            self.swapped.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            if not self._fits(step, request.request_id, end, 1, row):
                return  # back in a slot; it decodes next step
            self._grow(request, end)
            step.add(request, 1, row)
            next_pages += self.kv.chunks_to_grow(request.request_id, end + 1)
            if end == request.num_tokens:
                self._plan_forks(step, request, end)
