"""Which cached KV block to evict next: plain LRU, or Jenga's prefix-subset evictor.

Cached blocks are parked by the request that held them last (its *release*: pages that slid out of a
window while it ran, and the rest when it ends); the release holding the least recently parked block
goes first, under both evictors. They differ inside it:
- `lru` evicts in park order. A request frees page 0 first, so its head goes first and every prefix
  hit on that chain is lost with the first eviction.
- `prefix_subset` evicts what loses the least hit length. The release's target hit ends at its
  deepest page a prefix hit has used (a shared prompt), or, if none was, at its deepest full-attention
  page. Pages past the target go first (tail first: nobody hit them); then the blocks the target hit
  does not need (sliding-window pages before its window, oldest first), which lose nothing of it;
  then the target's own pages, deepest first in every kind, each costing one page of hit length, so
  the cached prefix shrinks from its end while staying a valid hit for every kind (balanced and
  aligned, as in the paper). A release no hit has used yet does not know where its shared prefix ends
  (its prompt's private tail is past it): it keeps the sliding pages of every hit within one window of
  its end, not only the last window's, so a hit at the shared boundary is still there when the next
  request on that prefix comes (measured: docs/JENGA.md).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence

from memory.kv.blocks import KVBlock
from memory.kv.cache_policy import CachePolicy, FullAttentionPolicy, SlidingWindowPolicy


class Evictor(ABC):
    name: str

    @abstractmethod
    def choose(self, release: Sequence[KVBlock]) -> KVBlock:
        """The block to evict from the oldest release (its blocks in park order; never empty)."""

    def choose_among(self, blocks: Sequence[KVBlock]) -> KVBlock:
        """The block to evict of every evictable one (least recently parked first): from the oldest release."""
        oldest = blocks[0].release
        return self.choose([b for b in blocks if b.release == oldest])


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
        # how far before a release's end its unknown shared boundary may be: the widest window
        self.reach = max((p.window for p in policies if isinstance(p, SlidingWindowPolicy)), default=0)

    def choose(self, release: Sequence[KVBlock]) -> KVBlock:
        return min(release, key=self._cost_in(release))

    def choose_among(self, blocks: Sequence[KVBlock]) -> KVBlock:
        """Blocks no release's target hit needs go first, whichever release parked them (a prompt that
        missed parks every sliding page it slid past: they must not outlive older releases' hits);
        then the oldest release's, as `choose` orders them."""
        releases: dict[int, list[KVBlock]] = {}
        for block in blocks:
            releases.setdefault(block.release, []).append(block)
        best, best_key = blocks[0], None
        for rank, release in enumerate(releases.values()):
            cost = self._cost_in(release)
            for block in release:
                key = cost(block)
                key = (key[0] == 2, rank, key)
                if best_key is None or key < best_key:
                    best, best_key = block, key
            if not best_key[0]:
                break  # a free block: later releases rank after it
        return best

    def _cost_in(self, release: Sequence[KVBlock]) -> Callable[[KVBlock], tuple[int, int, int]]:
        reused = [b.page for b in release if b.reused]
        full_pages = [b.page for b in release if isinstance(self.policies[b.group], FullAttentionPolicy)]
        target_page = max(reused or full_pages or [b.page for b in release])
        page_tokens = self.policies[0].page_tokens
        target_hit = (target_page + 1) * page_tokens
        # no hit has used it: the shared boundary may be anywhere within `reach` tokens of its end
        low_hit = target_hit if reused else max(0, target_hit - self.reach) // page_tokens * page_tokens
        needed = [range(p.hit_pages(low_hit).start, p.hit_pages(target_hit).stop) for p in self.policies]

        def cost(block: KVBlock) -> tuple[int, int, int]:
            if block.page > target_page:
                return (0, -block.page, block.group)  # past every hit so far: tail first
            if block.page not in needed[block.group]:
                return (1, block.page, block.group)  # not needed by the target hit: free to drop
            return (2, -block.page, block.group)  # shortens the hit by a page: the deepest first

        return cost


EVICTORS: Mapping[str, Callable[[Sequence[CachePolicy]], Evictor]] = {
    LruEvictor.name: LruEvictor,
    PrefixSubsetEvictor.name: PrefixSubsetEvictor,
}
AUTO = "auto"


def resolve_evictor(name: str, policies: Sequence[CachePolicy]) -> str:
    """`auto`: `prefix_subset` when a kind has a sliding window (measured above LRU there, docs/JENGA.md),
    else `lru` (full attention alone gains less, for a scan of the cache per eviction); other names as given."""
    if name == AUTO:
        sliding = any(isinstance(p, SlidingWindowPolicy) for p in policies)
        return PrefixSubsetEvictor.name if sliding else LruEvictor.name
    if name not in EVICTORS:
        raise ValueError(f"unknown KV evictor {name!r} (auto | {' | '.join(EVICTORS)})")
    return name
