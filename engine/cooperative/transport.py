"""How stage 1's hidden states reach stage 2: a queue when both stages live in one process, a
torch.distributed point-to-point pair (gloo on CPU, NCCL on GPU) when they are two replicas.

Contract: `send(hidden)` is called by stage 1 once per micro-batch, in order; `recv(out)` by stage 2
once per micro-batch, in the same order, with `out` of the same shape and dtype; `send` may return
before the peer received (it must not keep a view of `hidden`: stage 1 reuses its workspace).
`cancel(like)` (stage 1's side, after a failure) stands in for one micro-batch that will never be
sent (`like`: a tensor of its shape and dtype), so stage 2 does not wait forever; the step fails.
"""

from __future__ import annotations

import itertools
import queue
from typing import Protocol

import torch


class StageCancelled(RuntimeError):
    """Stage 1 failed before sending this micro-batch's hidden states."""


class HiddenTransport(Protocol):
    def send(self, hidden: torch.Tensor) -> None: ...

    def recv(self, out: torch.Tensor) -> None: ...

    def cancel(self, like: torch.Tensor) -> None: ...


class QueueTransport:
    """Both stages in one process: a copy through a queue."""

    def __init__(self) -> None:
        self._queue: queue.Queue[torch.Tensor | None] = queue.Queue()

    def send(self, hidden: torch.Tensor) -> None:
        self._queue.put(hidden.clone())

    def recv(self, out: torch.Tensor) -> None:
        hidden = self._queue.get()
        if hidden is None:
            raise StageCancelled("stage 1 failed before sending this micro-batch")
        out.copy_(hidden)

    def cancel(self, like: torch.Tensor) -> None:
        self._queue.put(None)


class ProcessGroupTransport:
    """Point-to-point over a two-rank process group (built like the migration's KV channels:
    `ProcessGroupGloo(store, rank, 2)`, see deployments/migration/kv_channel.py). Stage 1 is rank 0 of
    `send_group`, stage 2 is rank 1 of `recv_group` (one process passes both when it holds both stages).
    Tags count up on both sides in step, so messages match one to one."""

    SENDER, RECEIVER = 0, 1

    def __init__(self, send_group=None, recv_group=None):
        self.send_group = send_group
        self.recv_group = recv_group
        self._send_tags = itertools.count()
        self._recv_tags = itertools.count()

    def send(self, hidden: torch.Tensor) -> None:
        self.send_group.send([hidden.contiguous()], self.RECEIVER, next(self._send_tags)).wait()

    def recv(self, out: torch.Tensor) -> None:
        self.recv_group.recv([out], self.SENDER, next(self._recv_tags)).wait()

    def cancel(self, like: torch.Tensor) -> None:
        self.send(torch.zeros_like(like))  # stage 2 computes on zeros; the step raises, its result is dropped
