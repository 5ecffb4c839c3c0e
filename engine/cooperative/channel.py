"""The link between the two processes of a cross-process cooperative pair: one two-rank process group
(gloo on CPU, NCCL on GPU), built by the caller (deployments/ or a test) and handed in ready.

Rank 0 is the leader (stage 1, the pair's scheduler), rank 1 the follower (stage 2). Each direction keeps
its own tag counter, so point-to-point messages match one to one in the order they were sent. Objects
(control messages: step plans, layout logs, request snapshots, outputs) travel pickled as a length and a
byte tensor; tensors (hidden states) travel as they are; KV carried across forming and dissolving travels as the
migration's KV stages. Any failure of the group (the peer died, the
timeout passed) raises `PeerLost`; the pair then ends (engine/cooperative/remote.py, follower.py).

`watch(store)` adds a heartbeat (heartbeat.py): a peer that hangs without closing its sockets is judged
lost after `hang_after_s` instead of the group's timeout. The heartbeat thread then breaks the group so a
call blocked on it returns at once: on gloo by a receive on an unused tag waited with a 1 ms timeout (gloo
closes the pair on an application timeout, and every call waiting on it fails); on other backends by
`abort()`. Every call after that raises `PeerLost` saying how long the peer was silent.
"""

from __future__ import annotations

import datetime
import itertools
import os
import pickle

import torch
import torch.distributed as dist

from engine.cooperative.heartbeat import Heartbeat
from engine.migration import KVStage, pack, unpack


def loopback_pair(port: int, rank: int, timeout: datetime.timedelta, store=None) -> PairChannel:
    """A pair's channel between two processes of this machine (benchmarks, tests): a gloo group on 127.0.0.1
    over the TCPStore at `port` (`store`: the one this process hosts, else a client of it is made)."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if store is None:
        store = dist.TCPStore("127.0.0.1", port, 2, False, timeout=timeout)
    options = dist.ProcessGroupGloo._Options()
    options._timeout = timeout
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    channel = PairChannel(dist.ProcessGroupGloo(dist.PrefixStore("pair/", store), rank, 2, options), rank)
    channel.store = store  # the store must live as long as the group
    return channel


class PeerLost(ConnectionError):
    """The other process of the pair stopped answering."""


class PairChannel:
    LEADER, FOLLOWER = 0, 1
    BREAK_TAG = 1 << 30  # never a message's: tags count up from 0 per direction

    def __init__(self, group, rank: int):
        if rank not in (self.LEADER, self.FOLLOWER):
            raise ValueError(f"a pair has ranks 0 and 1, not {rank}")
        self.group = group
        self.rank = rank
        self.peer = 1 - rank
        self._send_tags = itertools.count()
        self._recv_tags = itertools.count()
        self._pending: list = []  # (work, tensor): sends not yet known complete (the tensor must stay alive)
        self.num_bytes_sent = 0
        self.heartbeat: Heartbeat | None = None
        self.silent_for: float | None = None  # set when the heartbeat judged the peer hung
        self._kept_alive: list = []  # buffers of calls cut short by a break (gloo may still write them)

    # ---- liveness ----------------------------------------------------------------------------------
    def watch(self, store, interval_s: float = 0.25, hang_after_s: float = 3.0) -> None:
        """Judges the peer lost once it has not beaten for `hang_after_s` (`store`: a client of the pair's
        store for the heartbeat alone)."""
        self.heartbeat = Heartbeat(store, self.rank, self._break, interval_s, hang_after_s)

    def close(self) -> None:
        """The pair ended: stop the heartbeat (the group itself is left to its owner)."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat = None

    def _break(self, silent_for: float) -> None:
        self.silent_for = silent_for
        try:
            if not isinstance(self.group, dist.ProcessGroupGloo):
                self.group.abort()
            else:
                dummy = torch.empty(1)
                self._kept_alive.append(dummy)
                self.group.recv([dummy], self.peer, self.BREAK_TAG).wait(datetime.timedelta(milliseconds=1))
        except RuntimeError:
            pass  # the expected timeout: the group is closed now

    def _lost(self, what: str, error: BaseException | None = None) -> PeerLost:
        if self.silent_for is not None:
            return PeerLost(f"{what} rank {self.peer}: no heartbeat from it for {self.silent_for:.1f} s")
        return PeerLost(f"{what} rank {self.peer} failed: {error}")

    def _check(self, what: str) -> None:
        if self.silent_for is not None:
            raise self._lost(what)

    def send_tensor(self, tensor: torch.Tensor, wait: bool = False) -> None:
        """Sends without waiting for the peer (unless `wait`); `tensor` is kept alive until `flush`."""
        self._check("sending to")
        tensor = tensor.contiguous()
        self._pending = [(work, kept) for work, kept in self._pending if not work.is_completed()]
        try:
            work = self.group.send([tensor], self.peer, next(self._send_tags))
            self._pending.append((work, tensor))
            self.num_bytes_sent += tensor.numel() * tensor.element_size()
            if wait:
                self.flush()
        except RuntimeError as error:
            raise self._lost("sending to", error) from error

    def recv_tensor(self, out: torch.Tensor) -> torch.Tensor:
        self._check("receiving from")
        try:
            self.group.recv([out], self.peer, next(self._recv_tags)).wait()
        except RuntimeError as error:
            self._kept_alive.append(out)
            raise self._lost("receiving from", error) from error
        return out

    def flush(self) -> None:
        """Waits until every send so far has left."""
        try:
            for work, _ in self._pending:
                work.wait()
        except RuntimeError as error:
            self._kept_alive += [kept for _, kept in self._pending]
            raise self._lost("sending to", error) from error
        finally:
            self._pending.clear()

    def send_object(self, message: object) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(message)), dtype=torch.uint8)
        self.send_tensor(torch.tensor([payload.numel()], dtype=torch.int64))
        self.send_tensor(payload)

    def recv_object(self) -> object:
        size = self.recv_tensor(torch.empty(1, dtype=torch.int64))
        payload = self.recv_tensor(torch.empty(int(size.item()), dtype=torch.uint8))
        return pickle.loads(payload.numpy().tobytes())

    def send_stage(self, stage: KVStage) -> None:
        """Some layers of one request's KV (a pair forming or dissolving): a header, then one flat tensor, in
        the migration's wire format (engine/migration.py `pack`)."""
        header, flat = pack(stage)
        self.send_object(header)
        self.send_tensor(flat)

    def recv_stage(self, device: torch.device | str = "cpu") -> KVStage:
        header = self.recv_object()
        flat = self.recv_tensor(torch.empty(header.numel, dtype=getattr(torch, header.dtype), device=device))
        return unpack(header, flat)
