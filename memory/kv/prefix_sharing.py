"""Prefix sharing: full pages of KV found by the hash of every token up to them, mapped into another request
instead of computed again (the prefix cache, `PrefixCache` in blocks.py).

`PrefixSharing` is mixed into `KVCacheManager` (it provides spec, policies, prefix, layout, blocks,
`enable_prefix_caching`, `_deflate_block`, and `LayerResidency.is_whole_on_device`). Contract:
- a hit is a whole number of pages and leaves at least one token to compute; it needs only the pages each
  layer group's policy reads (all pages for full attention, the window's for a sliding window: Jenga's
  aligned prefix-subset hit), and `admit` maps exactly the blocks `hit_blocks` names (held, not copied);
- a page becomes shareable once its tokens are committed, in every group that holds it whole on the device
  (a block with layers on the host is private); a page another request cached too is marked `reused`;
- cached blocks nobody holds are the first memory given back when the pool asks (`_reclaim`, LRU order or
  the evictor's).
"""

from __future__ import annotations

from collections.abc import Sequence

from memory.kv.blocks import KVBlock, chain_hash


class PrefixSharing:
    def match_prefix(self, token_ids: Sequence[int]) -> int:
        """The longest prefix (whole pages; at least one token is always left to compute so the
        request has logits to sample from) whose pages every layer group's policy needs are cached:
        all pages before it for full attention, only the window's pages before it for a sliding
        window (Jenga's aligned prefix-subset hit)."""
        if not self.enable_prefix_caching:
            return 0
        page_tokens = self.spec.tokens_per_page
        hashes: list[int] = []
        while (len(hashes) + 1) * page_tokens <= len(token_ids) - 1:
            start = len(hashes) * page_tokens
            hashes.append(chain_hash(hashes[-1] if hashes else None, token_ids[start : start + page_tokens]))
        for num_pages in range(len(hashes), 0, -1):
            hit = num_pages * page_tokens
            if all(self.prefix.lookup(group, hashes[page]) is not None
                   for group, policy in enumerate(self.policies) for page in policy.hit_pages(hit)):
                return hit
        return 0

    def hit_blocks(self, token_ids: Sequence[int], num_cached: int) -> list[KVBlock]:
        """The cached blocks `admit` would hold for a prefix hit of `num_cached` tokens."""
        return [block for _, _, _, block in self._hit(token_ids, num_cached) if block is not None]

    def _hit(self, token_ids: Sequence[int], num_cached: int):
        """(page, its hash, group, cached block or None when the group does not need the page) of a hit."""
        parent = None
        needed = [policy.hit_pages(num_cached) for policy in self.policies]
        for page in range(num_cached // self.spec.tokens_per_page):
            start = page * self.spec.tokens_per_page
            parent = chain_hash(parent, token_ids[start : start + self.spec.tokens_per_page])
            for group in range(len(self.spec.groups)):
                yield page, parent, group, (self.prefix.lookup(group, parent) if page in needed[group] else None)

    def _map_hit(self, state, slot: int, token_ids: Sequence[int], num_cached: int) -> None:
        """Admission: maps the hit's cached blocks into the new request's slot (shared: one more holder)."""
        for page, page_hash, group, block in self._hit(token_ids, num_cached):
            if len(state.hashes) == page:
                state.hashes.append(page_hash)
            if block is None:  # e.g. slid out of the window: not needed, maybe evicted
                state.blocks[group].append(None)
                continue
            self.prefix.hold(block)
            self.blocks.parked(block, False)
            self.layout.map_block(slot, page, block)
            state.blocks[group].append(block)
        if self.enable_prefix_caching:
            self.prefix.num_queried_tokens += len(token_ids)
            self.prefix.num_hit_tokens += num_cached

    def _share_full_pages(self, state, token_ids: Sequence[int]) -> None:
        """Commit: the request's pages now full of computed tokens go into the prefix cache."""
        page_tokens = self.spec.tokens_per_page
        while (len(state.hashes) + 1) * page_tokens <= state.num_tokens:
            page = len(state.hashes)
            parent = state.hashes[-1] if state.hashes else None
            block_hash = chain_hash(parent, token_ids[page * page_tokens : (page + 1) * page_tokens])
            state.hashes.append(block_hash)
            shared = False
            for group in range(len(self.spec.groups)):
                block = state.blocks[group][page]
                # a block with layers on the host is private: other requests could not map it
                if block is not None and block.block_hash is None and self.is_whole_on_device(block):
                    block.page = page
                    shared |= self.prefix.insert(block, block_hash) is not block
            if shared:  # another request cached these tokens too: a shared prefix reaches this page
                for pages in state.blocks:
                    if pages[page] is not None and pages[page].block_hash is not None:
                        pages[page].reused = True

    def _reclaim(self, num_chunks: int) -> int:
        """The pool asks for memory back: give up least recently used cached pages."""
        given = 0
        while given < num_chunks and self.prefix.evictable:
            block = self.prefix.evict_oldest()
            self._deflate_block(block)
            given += len(block.chunks)
        return given
