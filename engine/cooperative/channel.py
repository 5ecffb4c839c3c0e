"""The link between the two processes of a cross-process cooperative pair: one two-rank process group
(gloo on CPU, NCCL on GPU), built by the caller (deployments/ or a test) and handed in ready.

Rank 0 is the leader (stage 1, the pair's scheduler), rank 1 the follower (stage 2). Each direction keeps
its own tag counter, so point-to-point messages match one to one in the order they were sent. Objects
(control messages: step plans, layout logs, request snapshots, outputs) travel pickled as a length and a
byte tensor; tensors (hidden states) travel as they are; KV carried across forming and dissolving travels as the
migration's KV stages. Any failure of the group (the peer died, the
timeout passed) raises `PeerLost`; the pair then ends (engine/cooperative/remote.py, follower.py).
"""

from __future__ import annotations

import itertools
import pickle

import torch

from engine.migration import KVStage, pack, unpack


class PeerLost(ConnectionError):
    """The other process of the pair stopped answering."""


class PairChannel:
    LEADER, FOLLOWER = 0, 1

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

    def send_tensor(self, tensor: torch.Tensor, wait: bool = False) -> None:
        """Sends without waiting for the peer (unless `wait`); `tensor` is kept alive until `flush`."""
        tensor = tensor.contiguous()
        self._pending = [(work, kept) for work, kept in self._pending if not work.is_completed()]
        try:
            work = self.group.send([tensor], self.peer, next(self._send_tags))
            self._pending.append((work, tensor))
            self.num_bytes_sent += tensor.numel() * tensor.element_size()
            if wait:
                self.flush()
        except RuntimeError as error:
            raise PeerLost(f"sending to rank {self.peer} failed: {error}") from error

    def recv_tensor(self, out: torch.Tensor) -> torch.Tensor:
        try:
            self.group.recv([out], self.peer, next(self._recv_tags)).wait()
        except RuntimeError as error:
            raise PeerLost(f"receiving from rank {self.peer} failed: {error}") from error
        return out

    def flush(self) -> None:
        """Waits until every send so far has left."""
        try:
            for work, _ in self._pending:
                work.wait()
        except RuntimeError as error:
            raise PeerLost(f"sending to rank {self.peer} failed: {error}") from error
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
