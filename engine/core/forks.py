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
"""

from __future__ import annotations

from engine.core.request import Request


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
