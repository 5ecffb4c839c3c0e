"""ElasticPool: one device's memory budget, cut into chunks and lent to named clients (balloons).

Clients (`kv`, `activations`, `weights`, any name) `inflate` to take chunks and `deflate` to give
them back. When free chunks run out the policy names the clients to reclaim from, and the pool
calls their `reclaim(n)` callbacks, which give chunks back through `deflate`.

Physical chunks are created by the backend lazily, on first use, and kept in a free list when
deflated so they are reused without new allocation; `trim()` returns free ones to the OS.
Chunks handed out may hold stale data from their previous holder (never uninitialised memory:
new host/sim chunks are zero). Invariants kept exactly: sum(held) + free == num_chunks; at most
num_chunks chunks are physically alive; a chunk is owned by exactly one client or is free.
"""

from __future__ import annotations

import functools
import heapq
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from memory.host_buffer import HostBuffer
from memory.policies import PoolPolicy, create_policy
from memory.vmm.base import BackendClosed, PhysicalChunk, VmmBackend


class PoolExhausted(RuntimeError):
    """`inflate` could not get `requested` chunks for `client`; `available` is how many it could
    have had (free + reclaimed, within the policy's limit). Nothing was handed out."""

    def __init__(self, client: str, requested: int, available: int) -> None:
        super().__init__(f"pool exhausted: {client!r} asked for {requested} chunks, {available} available")
        self.client = client
        self.requested = requested
        self.available = available


@dataclass(frozen=True)
class PoolTelemetry:
    """A snapshot of the pool; `to_dict()` is JSON-serialisable."""

    backend: str
    policy: str
    budget_bytes: int
    chunk_bytes: int
    num_chunks: int
    chunks_per_client: dict[str, int]
    num_free_chunks: int
    num_alive_chunks: int  # physically created now (held + free-but-not-trimmed)
    host_buffer_used_bytes: int
    host_buffer_capacity_bytes: int
    num_inflates: int
    num_deflates: int
    num_reclaims: int  # reclaim callbacks that gave at least one chunk
    num_chunks_reclaimed: int
    num_exhausted: int
    bytes_swapped_out: int
    bytes_swapped_in: int

    def __post_init__(self) -> None:
        if sum(self.chunks_per_client.values()) + self.num_free_chunks != self.num_chunks:
            raise ValueError("telemetry does not account for every chunk")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (ints, strs and a str->int dict): json.dumps works on it."""
        return asdict(self)


def _locked(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(self: ElasticPool, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return method(self, *args, **kwargs)
    return wrapper


@dataclass
class _Client:
    name: str
    reclaim: Callable[[int], int] | None
    reclaimable: Callable[[], int] | None
    chunks: dict[int, PhysicalChunk] = field(default_factory=dict)  # chunk_id -> chunk


class ElasticPool:
    """`budget_bytes // chunk_bytes` chunks of `chunk_bytes` lent to registered clients.

    `policy` is a registered policy name ("elastic", "static") or a `PoolPolicy`;
    `static_split` (chunks) or `static_split_bytes` configure "static"; `reclaim_order` configures
    "elastic" (default: kv, then activations, then the others in registration order).
    Public methods are serialised by a lock, so `telemetry()` may be called from any thread.
    """

    def __init__(self, backend: VmmBackend, budget_bytes: int, chunk_bytes: int,
                 policy: str | PoolPolicy = "elastic", static_split: Mapping[str, int] | None = None,
                 host_buffer: HostBuffer | None = None, *,
                 static_split_bytes: Mapping[str, int] | None = None,
                 reclaim_order: Sequence[str] | None = None) -> None:
        if chunk_bytes <= 0 or chunk_bytes % backend.granularity:
            raise ValueError(f"chunk_bytes {chunk_bytes} must be a positive multiple of "
                             f"{backend.granularity}")
        if budget_bytes < chunk_bytes:
            raise ValueError(f"budget {budget_bytes} is smaller than one chunk ({chunk_bytes})")
        self.backend = backend
        self.budget_bytes = int(budget_bytes)
        self.chunk_bytes = int(chunk_bytes)
        self.num_chunks = self.budget_bytes // self.chunk_bytes
        self.host_buffer = host_buffer
        if isinstance(policy, str):
            options: dict[str, Any] = {}
            for key, value in (("static_split", static_split), ("static_split_bytes", static_split_bytes),
                               ("reclaim_order", reclaim_order)):
                if value is not None:
                    options[key] = value
            policy = create_policy(policy, num_chunks=self.num_chunks, chunk_bytes=self.chunk_bytes,
                                   **options)
        self.policy = policy
        self._clients: dict[str, _Client] = {}
        self._free: list[tuple[int, int, PhysicalChunk]] = []  # heap: (physical_offset, chunk_id, chunk)
        self._num_uncreated = self.num_chunks
        self._is_reclaiming = False
        self._lock = threading.RLock()  # telemetry may be read from another thread
        self.is_closed = False
        self._counts = dict.fromkeys(("inflates", "deflates", "reclaims", "chunks_reclaimed", "exhausted",
                                      "bytes_out", "bytes_in"), 0)

    # ---- clients -------------------------------------------------------------------------------
    @_locked
    def register(self, client: str, reclaim: Callable[[int], int] | None = None,
                 reclaimable: Callable[[], int] | None = None) -> None:
        """Add a client. `reclaim(n)` is asked to give back up to n chunks (through `deflate`) and
        returns how many it gave; `reclaimable()` says, without side effects, how many it could."""
        self._check_open()
        if client in self._clients:
            raise ValueError(f"client {client!r} is already registered")
        self._clients[client] = _Client(client, reclaim, reclaimable)

    @property
    def clients(self) -> tuple[str, ...]:
        """Registered client names, in registration order."""
        return tuple(self._clients)

    def num_held(self, client: str) -> int:
        """Chunks `client` holds now."""
        return len(self._client(client).chunks)

    def num_free(self) -> int:
        """Chunks nobody holds (physically alive or not yet created)."""
        return len(self._free) + self._num_uncreated

    @property
    def num_alive(self) -> int:
        """Chunks physically allocated now (held + free list)."""
        return self.num_chunks - self._num_uncreated

    # ---- inflate / deflate ---------------------------------------------------------------------
    @_locked
    def num_obtainable(self, client: str) -> int:
        """The most `client` can inflate now: free chunks plus what the clients the policy would
        reclaim from say (via `reclaimable()`) they could give, capped by the policy's limit.
        Cheap, no side effects."""
        reclaimable = sum(self._reclaimable(name, exact=True)
                          for name in self.policy.reclaim_order(client, self.clients))
        return min(self._limit(client), self.num_free() + reclaimable)

    def can_inflate(self, client: str, num_chunks: int) -> bool:
        """Whether `inflate(client, num_chunks)` would succeed (num_chunks <= num_obtainable)."""
        return num_chunks <= self.num_obtainable(client)

    @_locked
    def inflate(self, client: str, num_chunks: int) -> list[PhysicalChunk]:
        """Give `client` `num_chunks` chunks, reclaiming from others as the policy allows.
        All or nothing: raises PoolExhausted and gives nothing if it cannot."""
        self._check_open()
        if num_chunks < 0:
            raise ValueError(f"num_chunks must be >= 0, got {num_chunks}")
        if self._is_reclaiming:
            raise RuntimeError("inflate called from inside a reclaim callback")
        state = self._client(client)
        limit = self._limit(client)
        if num_chunks > limit:
            self._counts["exhausted"] += 1
            raise PoolExhausted(client, num_chunks, min(limit, self.num_free()))
        missing = num_chunks - self.num_free()
        if missing > 0:
            order = self.policy.reclaim_order(client, self.clients)
            upper_bound = sum(self._reclaimable(name, exact=False) for name in order)
            if missing <= upper_bound:
                self._reclaim(order, missing)
            if num_chunks > self.num_free():
                self._counts["exhausted"] += 1
                raise PoolExhausted(client, num_chunks, self.num_free())
        chunks: list[PhysicalChunk] = []
        try:
            for _ in range(num_chunks):
                chunks.append(self._take_free())
        except BaseException:  # e.g. the device ran out below the budget: give nothing
            for chunk in chunks:
                heapq.heappush(self._free, (chunk.physical_offset, chunk.chunk_id, chunk))
            raise
        for chunk in chunks:
            chunk.owner = client
            state.chunks[chunk.chunk_id] = chunk
        self._counts["inflates"] += 1
        return chunks

    @_locked
    def deflate(self, client: str, chunks: Sequence[PhysicalChunk]) -> None:
        """`client` gives `chunks` back to the free list. They must be held by `client` and
        unmapped everywhere. Checked all-or-nothing."""
        self._check_open()
        state = self._client(client)
        seen: set[int] = set()
        for chunk in chunks:
            if state.chunks.get(chunk.chunk_id) is not chunk or chunk.chunk_id in seen:
                raise ValueError(f"chunk {chunk.chunk_id} is not held by {client!r} (owner: {chunk.owner!r})")
            if chunk.num_mappings:
                raise ValueError(f"chunk {chunk.chunk_id} is still mapped at {chunk.num_mappings} places")
            seen.add(chunk.chunk_id)
        for chunk in chunks:
            del state.chunks[chunk.chunk_id]
            chunk.owner = None
            heapq.heappush(self._free, (chunk.physical_offset, chunk.chunk_id, chunk))
        if chunks:
            self._counts["deflates"] += 1

    @_locked
    def trim(self, keep_free: int = 0) -> int:
        """Release free physical chunks to the OS/driver until at most `keep_free` stay alive in
        the free list (the physically highest go first). Returns how many were released."""
        self._check_open()
        if keep_free < 0:
            raise ValueError(f"keep_free must be >= 0, got {keep_free}")
        if len(self._free) <= keep_free:
            return 0
        ordered = sorted(self._free)
        self._free = ordered[:keep_free]  # a sorted list is a valid heap
        for _, _, chunk in ordered[keep_free:]:
            self.backend.release_chunk(chunk)
        released = len(ordered) - keep_free
        self._num_uncreated += released
        return released

    @_locked
    def record_swap(self, bytes_out: int = 0, bytes_in: int = 0) -> None:
        """Count bytes moved device -> host buffer (out) and back (in), for telemetry."""
        if bytes_out < 0 or bytes_in < 0:
            raise ValueError("swapped byte counts must be >= 0")
        self._counts["bytes_out"] += bytes_out
        self._counts["bytes_in"] += bytes_in

    @_locked
    def telemetry(self) -> PoolTelemetry:
        """A cheap consistent snapshot (O(number of clients))."""
        host = self.host_buffer
        return PoolTelemetry(
            backend=self.backend.name, policy=self.policy.name, budget_bytes=self.budget_bytes,
            chunk_bytes=self.chunk_bytes, num_chunks=self.num_chunks,
            chunks_per_client={name: len(state.chunks) for name, state in self._clients.items()},
            num_free_chunks=self.num_free(), num_alive_chunks=self.num_alive,
            host_buffer_used_bytes=host.used_bytes if host is not None else 0,
            host_buffer_capacity_bytes=host.capacity_bytes if host is not None else 0,
            num_inflates=self._counts["inflates"], num_deflates=self._counts["deflates"],
            num_reclaims=self._counts["reclaims"], num_chunks_reclaimed=self._counts["chunks_reclaimed"],
            num_exhausted=self._counts["exhausted"], bytes_swapped_out=self._counts["bytes_out"],
            bytes_swapped_in=self._counts["bytes_in"])

    @_locked
    def close(self) -> None:
        """Release every free chunk and every held chunk that is not mapped; later calls raise
        BackendClosed. Chunks still mapped are left to the backend's own close(). Idempotent."""
        if self.is_closed or self.backend.is_closed:
            self.is_closed = True
            return
        self.trim(0)
        for state in self._clients.values():
            for chunk in list(state.chunks.values()):
                if chunk.num_mappings == 0:
                    self.backend.release_chunk(chunk)
                    chunk.owner = None
                    del state.chunks[chunk.chunk_id]
        self.is_closed = True

    # ---- helpers -------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.is_closed:
            raise BackendClosed("ElasticPool used after close()")

    def _client(self, client: str) -> _Client:
        try:
            return self._clients[client]
        except KeyError:
            raise KeyError(f"unknown pool client {client!r}; register it first") from None

    def _limit(self, client: str) -> int:
        headroom = self.policy.headroom(client, self.num_held(client))
        return self.num_chunks - self.num_held(client) if headroom is None else headroom

    def _reclaimable(self, client: str, exact: bool) -> int:
        """What `client` could give back: its `reclaimable()` if given; otherwise 0 when `exact`
        (can_inflate promises nothing it cannot know) or everything it holds (an upper bound)."""
        state = self._clients[client]
        if state.reclaim is None:
            return 0
        if state.reclaimable is not None:
            return min(max(0, int(state.reclaimable())), len(state.chunks))
        return 0 if exact else len(state.chunks)

    def _reclaim(self, order: Sequence[str], missing: int) -> None:
        for name in order:
            if missing <= 0:
                return
            state = self._clients[name]
            if state.reclaim is None or not state.chunks:
                continue
            held_before = len(state.chunks)
            self._is_reclaiming = True
            try:
                reported = state.reclaim(missing)
            finally:
                self._is_reclaiming = False
            given = held_before - len(state.chunks)
            if reported != given:
                raise RuntimeError(f"reclaim callback of {name!r} reported {reported} chunks "
                                   f"but deflated {given}")
            if given:
                self._counts["reclaims"] += 1
                self._counts["chunks_reclaimed"] += given
                missing -= given

    def _take_free(self) -> PhysicalChunk:
        if self._free:
            return heapq.heappop(self._free)[2]
        self._num_uncreated -= 1
        try:
            return self.backend.create_chunk(self.chunk_bytes)
        except BaseException:
            self._num_uncreated += 1
            raise
