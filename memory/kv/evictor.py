"""Which cached KV block to evict next: plain LRU, or Jenga's prefix-subset evictor.

Cached blocks are parked by the request that held them last (its *release*: pages that slid out of a
window while it ran, and the rest when it ends); the release holding the least recently parked block
goes first, under both evictors. They differ inside it:
- `lru` evicts in park order. A request frees page 0 first, so its head goes first and every prefix
  hit on that chain is lost with the first eviction.
- `prefix_subset` evicts what loses the least hit length. The release's longest hit is its deepest
  full-attention page (every kind aligned on it); blocks that hit does not need (sliding-window pages
  before its window) go first, oldest page first, and lose nothing of it; then the tail page of every
  kind (deepest first), each costing one page of hit length, so the cached prefix shrinks from its
  end while staying a valid hit for every kind (balanced and aligned, as in the paper).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

from memory.kv.blocks import KVBlock
from memory.kv.cache_policy import CachePolicy, FullAttentionPolicy


class Evictor(ABC):
    name: str

    @abstractmethod
    def choose(self, release: Sequence[KVBlock]) -> KVBlock:
        """The block to evict from the oldest release (its blocks in park order; never empty)."""


class LruEvictor(Evictor):
    name = "lru"

    def __init__(self, policies: Sequence[CachePolicy]):
        self.policies = policies

    def choose(self, release: Sequence[KVBlock]) -> KVBlock:
        return release[0]


class PrefixSubsetEvictor(Evictor):
    name = "prefix_subset"

    def __init__(self, policies: Sequence[CachePolicy]):
        self.policies = policies

    def choose(self, release: Sequence[KVBlock]) -> KVBlock:
        full_pages = [b.page for b in release if isinstance(self.policies[b.group], FullAttentionPolicy)]
        tail_page = max(full_pages or [b.page for b in release])
        page_tokens = self.policies[0].page_tokens
        longest_hit = (tail_page + 1) * page_tokens

        def cost(block: KVBlock) -> tuple[int, int, int]:
            if block.page not in self.policies[block.group].hit_pages(longest_hit):
                return (0, block.page, block.group)  # not needed by the longest hit: free to drop
            return (1, -block.page, block.group)  # shortens the hit by a page: the deepest first

        return min(release, key=cost)


EVICTORS: Mapping[str, Callable[[Sequence[CachePolicy]], Evictor]] = {
    LruEvictor.name: LruEvictor,
    PrefixSubsetEvictor.name: PrefixSubsetEvictor,
}
