"""Per-kind KV cache policies (Jenga's layer-specific caching), one class per attention kind.

A policy answers two questions for its layer group, in pages of `page_tokens` tokens:
- `resident_pages(num_tokens)`: which pages a running request with `num_tokens` tokens stored must
  keep mapped (its next query is at position num_tokens - 1 or later);
- `hit_pages(hit_tokens)`: which cached pages a prefix hit of `hit_tokens` tokens needs, so that the
  request can compute from position `hit_tokens` on.
Full attention keeps and needs every page; a sliding window keeps only its window and a hit needs only
the window's pages before the hit (so sliding models get prefix hits even after the head of the
prompt slid out). A new kind (cross-attention, a constant-size state) is one more class here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

from memory.kv.spec import LayerGroup


class CachePolicy(ABC):
    name: str

    def __init__(self, page_tokens: int):
        self.page_tokens = page_tokens

    @abstractmethod
    def resident_pages(self, num_tokens: int) -> range:
        """Pages a request with `num_tokens` tokens must hold mapped."""

    @abstractmethod
    def hit_pages(self, hit_tokens: int) -> range:
        """Cached pages a prefix hit of `hit_tokens` tokens (a whole number of pages) needs."""


class FullAttentionPolicy(CachePolicy):
    name = "full"

    def resident_pages(self, num_tokens: int) -> range:
        return range(-(-num_tokens // self.page_tokens))

    def hit_pages(self, hit_tokens: int) -> range:
        return range(hit_tokens // self.page_tokens)


class SlidingWindowPolicy(CachePolicy):
    name = "sliding_window"

    def __init__(self, page_tokens: int, window: int):
        super().__init__(page_tokens)
        if window < 1:
            raise ValueError("window must be >= 1")
        self.window = window

    def resident_pages(self, num_tokens: int) -> range:
        # the next query (position num_tokens - 1 or later) sees keys > position - window
        first_token = max(0, num_tokens - self.window)
        return range(first_token // self.page_tokens, -(-num_tokens // self.page_tokens))

    def hit_pages(self, hit_tokens: int) -> range:
        # the first computed query is at position hit_tokens: it sees keys > hit_tokens - window
        first_token = max(0, hit_tokens + 1 - self.window)
        return range(first_token // self.page_tokens, hit_tokens // self.page_tokens)


CACHE_POLICIES: dict[str, Callable[..., CachePolicy]] = {
    FullAttentionPolicy.name: FullAttentionPolicy,
    SlidingWindowPolicy.name: SlidingWindowPolicy,
}


def policy_for(group: LayerGroup, page_tokens: int) -> CachePolicy:
    """The policy of a layer group: what its kind says (sliding window or full attention)."""
    if group.sliding_window is None:
        return CACHE_POLICIES[FullAttentionPolicy.name](page_tokens)
    return CACHE_POLICIES[SlidingWindowPolicy.name](page_tokens, group.sliding_window)
