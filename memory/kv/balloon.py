"""KVBalloon: the pool's `kv` client when KV lives in Jenga's large pages, shared by every KV manager of
a device.

One `LcmAllocator` cuts the balloon's large pages into small pages of every registered kind; each KV
manager (one per model served from the pool) registers its layer groups as kinds under its own owner
name, plus a callback that evicts one of its cached blocks. So two models' KV with different page sizes
and the activations all draw on one ElasticPool: a large page no kind uses goes back to the pool, and
when the pool asks the balloon for memory back, the members evict cached blocks (each in its own
evictor's order, members in registration order) until enough large pages have emptied.
`page_policy` (memory/page_policies.py) picks the allocator variant: `lcm` (Jenga), `pad_to_largest`
(vLLM's one page size) or a `StaticPartition` of the budget per kind, the benchmarks' baselines.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from memory.lcm_allocator import KindTelemetry, LcmAllocator
from memory.page_policies import PagePolicy
from memory.pool import ElasticPool

KV_CLIENT = "kv"

# evicts one cached block and frees its small page; returns the pool chunks that gave back, or None
# when the member has nothing evictable
EvictOne = Callable[[], int | None]


class KVBalloon:
    def __init__(self, pool: ElasticPool, client: str = KV_CLIENT, page_policy: PagePolicy | str = "lcm"):
        self.pool = pool
        self.client = client
        pool.register(client, reclaim=self._reclaim, reclaimable=self._reclaimable)
        self.allocator = LcmAllocator(pool, client, {}, page_policy)
        self._members: dict[str, EvictOne] = {}

    def attach(self, owner: str, small_page_bytes: Mapping[str, int], evict_one: EvictOne) -> dict[str, str]:
        """Registers a KV manager: its kinds (local name -> small-page bytes) become allocator kinds
        `owner/name`. Returns local name -> allocator kind."""
        if owner in self._members:
            raise ValueError(f"a KV manager named {owner!r} is already attached")
        kinds = {name: f"{owner}/{name}" for name in small_page_bytes}
        self.allocator.register({kinds[name]: size for name, size in small_page_bytes.items()})
        self._members[owner] = evict_one
        return kinds

    def resize(self, kinds: Mapping[str, int]) -> None:
        """New small-page sizes for kinds that hold nothing (a manager now keeps fewer layers)."""
        self.allocator.register(kinds)

    def detach(self, owner: str) -> None:
        del self._members[owner]

    def evict_one(self) -> int | None:
        """Evicts one cached block of the first member that has one; None if none has."""
        for evict in self._members.values():
            returned = evict()
            if returned is not None:
                return returned
        return None

    def telemetry(self) -> dict[str, KindTelemetry]:
        return self.allocator.all_telemetry()

    def _reclaim(self, num_chunks: int) -> int:
        given = 0
        while given < num_chunks:
            returned = self.evict_one()
            if returned is None:
                break
            given += returned
        return given

    def _reclaimable(self) -> int:
        return self.allocator.num_reclaimable_chunks()
