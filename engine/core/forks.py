"""The choices of one OpenAI request (n > 1) as the scheduler keeps them: one prefill, n sampled rows.

Requests with the same `prompt_group` share a prompt. The first one to arrive is the group's leader and is
scheduled like any request; the others are its followers (status FOLLOWING): they wait, holding nothing,
until the step that samples the leader's first token. That step samples every follower's first token too,
each from a copy of the leader's logits row (one sampled row per choice in the sampler's workspace), and
after it each follower forks the leader's KV (memory/kv/fork.py): the prompt is prefilled once.

A group stays open to followers only until its leader's first token is planned; a choice arriving later is
an ordinary request (the prefix cache still shares the prompt's full pages). Followers whose fork does not
fit in that step (slots, max_num_seqs, chunks), or whose leader cannot fork (layers on the host), become
ordinary waiting requests. If the leader ends before it samples (aborted), its first follower leads the rest.

`PromptForks` keeps the groups; `ForkScheduling` is the scheduler's part, mixed into `Scheduler`
(engine/core/scheduler.py): `_plan_forks` picks the followers that fork in the step sampling their leader's
first token (a slot each, within `max_num_seqs`, their rows in the step's workspace and the chunks of their
copies within `_room`, the scheduler's one admission rule) and `_fork` forks them after the step. It uses the
scheduler's `config`, `kv`, `forks`, `running`, `waiting` and `requests`; a follower not planned, or whose
fork fails after all, goes to the front of `waiting` as an ordinary request (to recompute its prompt).
"""

from __future__ import annotations

from engine.core.request import Request, RequestStatus
from engine.core.scheduler_plan import StepBuilder


class PromptForks:
    def __init__(self) -> None:
        self._leaders: dict[str, Request] = {}  # prompt group -> its leader, until its first token is planned
        self._followers: dict[str, list[Request]] = {}  # leader id -> followers, in arrival order

    def join(self, request: Request) -> bool:
        """Makes `request` a follower when its group has an open leader (True); else it may lead (False)."""
        group = request.prompt_group
        if group is None:
            return False
        leader = self._leaders.get(group)
        if leader is None or leader.is_finished or leader.output_token_ids or \
                leader.prompt_token_ids != request.prompt_token_ids:
            self._leaders[group] = request
            return False
        self._followers.setdefault(leader.request_id, []).append(request)
        return True

    def followers(self, leader_id: str) -> list[Request]:
        return self._followers.get(leader_id, [])

    def all_followers(self) -> list[Request]:
        return [follower for followers in self._followers.values() for follower in followers]

    def close(self, leader: Request) -> list[Request]:
        """The leader's first token is planned: the group closes; returns its followers (now detached)."""
        if self._leaders.get(leader.prompt_group) is leader:
            del self._leaders[leader.prompt_group]
        return self._followers.pop(leader.request_id, [])

    def rejoin(self, leader: Request, follower: Request) -> None:
        """The leader's first token was planned and then taken back (preempted in the same step): the group
        opens again with this follower."""
        self._leaders.setdefault(leader.prompt_group, leader)
        self._followers.setdefault(leader.request_id, []).append(follower)

    def leave(self, follower: Request) -> None:
        """A follower ends before the fork (aborted)."""
        for followers in self._followers.values():
            if follower in followers:
                followers.remove(follower)
                return

    def clear(self) -> None:
        self._leaders.clear()
        self._followers.clear()


class ForkScheduling:
    def _plan_forks(self, step: StepBuilder, leader: Request, end: int) -> None:
        """The leader's first token is planned: each of its followers that fits (a slot, its row in the step's
        workspace, the chunks of its copy of the last partial page) samples in this step and forks the
        leader's KV after it; the others become ordinary waiting requests."""
        followers = self.forks.close(leader)
        if not followers:
            return
        cost = self.kv.chunks_to_fork(end)
        forkable = self.kv.can_fork(leader.request_id)
        planned, released = [], []
        for follower in followers:
            row = follower.row_demand()
            forks_so_far = step.num_forks + len(planned)
            fits = forkable and len(self.running) + forks_so_far < self.config.max_num_seqs and \
                self.kv.num_free_slots > forks_so_far and cost * (len(planned) + 1) <= self._room(step, 0, row)
            if not fits:
                released.append(follower)
                continue
            planned.append(follower.request_id)
            step.rows += row
            step.row_of[follower.request_id] = row
        if planned:
            step.forks[leader.request_id] = planned
            step.fork_chunks[leader.request_id] = cost * len(planned)
        for follower in reversed(released):
            follower.status = RequestStatus.WAITING
            self.waiting.appendleft(follower)

    def _fork(self, leader_id: str, follower_ids: tuple[str, ...]) -> None:
        """After the step: the followers take the leader's KV (shared pages, a copy of the last partial one) and
        run; one whose fork fails after all recomputes its prompt and first token as an ordinary request."""
        leader = self.requests.get(leader_id)
        for follower_id in follower_ids:
            follower = self.requests.get(follower_id)
            if follower is None:
                continue
            if leader is not None and leader.status is RequestStatus.RUNNING and \
                    self.kv.fork(leader_id, follower_id):
                follower.num_computed_tokens = follower.num_cached_tokens = leader.num_computed_tokens
                follower.status = RequestStatus.RUNNING
                self.running.append(follower)
            else:
                follower.num_computed_tokens = 0
                follower.status = RequestStatus.WAITING
                self.waiting.appendleft(follower)
