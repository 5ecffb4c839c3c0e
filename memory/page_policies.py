"""How Jenga's two-level allocator (memory/lcm_allocator.py) sizes each kind's pages and caps its share:
one small policy class per variant, chosen by name (`create_page_policy`).

- `lcm` (Jenga): every kind's small page is the size it asks for; large pages are the LCM of those sizes
  and any kind may take any large page the pool lends.
- `pad_to_largest` (vLLM's hybrid KV cache manager): every kind's small page is padded to the largest
  kind's page, so one page size serves every kind; the padding is held but never used.
- `static_partition`: page sizes as `lcm`, but each kind may hold at most its fixed share of the KV
  budget (`shares`: kind -> fraction; the budget: `budget_chunks`, or the pool's free chunks when the
  allocator sizes its large pages).

A policy is asked again whenever kinds are added (a second KV manager attaching to the same balloon), so
padding follows the largest kind registered so far and the partition covers every kind.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Mapping
from typing import ClassVar

from memory.pool import ElasticPool


class PagePolicy(ABC):
    name: ClassVar[str]

    def allocated_bytes(self, requested: Mapping[str, int]) -> dict[str, int]:
        """Bytes one small page of each kind takes (>= what the kind asked for)."""
        return dict(requested)

    def large_page_limits(self, kinds: Mapping[str, int], chunks_per_large_page: int,
                          pool: ElasticPool) -> dict[str, int] | None:
        """At most how many large pages each kind may hold (None: no limit)."""
        return None


class LcmPages(PagePolicy):
    name = "lcm"


class PadToLargest(PagePolicy):
    name = "pad_to_largest"

    def allocated_bytes(self, requested: Mapping[str, int]) -> dict[str, int]:
        largest = max(requested.values(), default=0)
        return dict.fromkeys(requested, largest)


class StaticPartition(PagePolicy):
    name = "static_partition"

    def __init__(self, shares: Mapping[str, float], budget_chunks: int | None = None):
        if any(share < 0 for share in shares.values()) or sum(shares.values()) > 1 + 1e-9:
            raise ValueError("shares must be >= 0 and add up to at most 1")
        if budget_chunks is not None and budget_chunks < 0:
            raise ValueError("budget_chunks must be >= 0")
        self.shares = dict(shares)
        self.budget_chunks = budget_chunks

    def large_page_limits(self, kinds: Mapping[str, int], chunks_per_large_page: int,
                          pool: ElasticPool) -> dict[str, int]:
        missing = sorted(set(kinds) - set(self.shares))
        if missing:
            raise ValueError(f"the static partition has no share for kinds {missing}")
        budget = pool.num_free() if self.budget_chunks is None else self.budget_chunks
        total = budget // chunks_per_large_page
        return {kind: int(total * self.shares[kind]) for kind in kinds}


PAGE_POLICIES: dict[str, Callable[..., PagePolicy]] = {
    LcmPages.name: LcmPages,
    PadToLargest.name: PadToLargest,
    StaticPartition.name: StaticPartition,
}


def create_page_policy(name: str, **options) -> PagePolicy:
    try:
        return PAGE_POLICIES[name](**options)
    except KeyError:
        raise ValueError(f"unknown page policy {name!r}; known: {sorted(PAGE_POLICIES)}") from None
