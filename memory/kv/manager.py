"""KVCacheManager: one device's KV cache, built on virtual tensors and the pool's `kv` balloon.

What it decides: which slot a request occupies, which physical chunks back each of its pages, which
full pages are shared through the prefix cache, and what is swapped to the host. Chunks come from
the ElasticPool only when a page is needed and go back the moment nobody needs them, so KV and
activations trade memory step by step. The layout (where pages sit in virtual memory) is a strategy
object; the bookkeeping in `blocks.py` is plain Python. The prefix cache's matching, hits and commits are
`PrefixSharing` (prefix_sharing.py), mixed in like residency, swap, migration and forks.

Deterministic: the same sequence of calls gives the same slots, pages and chunks, which is how
tensor-parallel ranks keep their pools identical (rank 0 broadcasts the calls).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from memory.host_buffer import HostBuffer
from memory.kv.balloon import KVBalloon
from memory.kv.block_source import BlockSource, LcmBlocks, LooseChunks, TakenBlock
from memory.kv.blocks import KVBlock, PrefixCache, SlotTable
from memory.kv.cache_policy import policy_for
from memory.kv.evictor import EVICTORS, resolve_evictor
from memory.kv.fork import SequenceFork
from memory.kv.host_tier import HostChunkTier
from memory.kv.import_export import KVImportExport
from memory.kv.layered_migration import LayeredMigration
from memory.kv.layout import KVLayout
from memory.kv.mirror import RecordingLayout
from memory.kv.prefix_sharing import PrefixSharing
from memory.kv.registry import create_layout
from memory.kv.residency import DEVICE, HOST, HostPage, LayerResidency
from memory.kv.spec import KVCacheSpec
from memory.kv.swap import KVSwap
from memory.pool import ElasticPool, PoolExhausted

KV_CLIENT = "kv"


@dataclass
class RequestKV:
    request_id: str
    num_tokens: int = 0  # tokens whose K/V are stored (computed)
    blocks: list[list[KVBlock | None]] = field(default_factory=list)  # per group, per page
    hashes: list[int] = field(default_factory=list)  # chained hashes of full pages committed so far
    host_slots: list[list[list[int] | None]] | None = None  # set while swapped: per group, per page
    residency: list[str] = field(default_factory=list)  # per layer: where its new pages go, "device" | "host"
    host_pages: dict[tuple[int, int], HostPage] = field(default_factory=dict)  # (layer, page) -> host slots
    release: int = 0  # tags the cached blocks it parks, for the evictor (one id per request)

    @property
    def is_swapped(self) -> bool:
        return self.host_slots is not None


class KVCacheManager(PrefixSharing, LayerResidency, LayeredMigration, KVSwap, KVImportExport, SequenceFork):
    _kv_client = KV_CLIENT

    def __init__(
        self,
        spec: KVCacheSpec,
        pool: ElasticPool,
        dtype: torch.dtype,
        layout: str = "contiguous",
        host_buffer: HostBuffer | None = None,
        enable_prefix_caching: bool = True,
        layout_log: list | None = None,
        evictor: str = "lru",  # | "prefix_subset" | "auto" (prefix_subset when a kind has a sliding window)
        host_tier: HostChunkTier | None = None,
        balloon: KVBalloon | None = None,
        owner: str = KV_CLIENT,
    ):
        """Layouts of small pages (`paged`) take their blocks from Jenga's LCM allocator in `balloon` (the
        pool's `kv` client, shared with other KV managers of the same pool under distinct `owner` names;
        None: a balloon of its own); `contiguous` takes loose pool chunks."""
        if pool.chunk_bytes != spec.page_bytes:
            raise ValueError(f"pool chunks ({pool.chunk_bytes} B) must equal KV pages ({spec.page_bytes} B)")
        self.spec = spec
        self.pool = pool
        self.host_buffer = host_buffer
        self.host_tier = host_tier  # in-place offloading (host backend): offloaded pages stay mapped
        self.layout: KVLayout = create_layout(layout, spec, pool.backend, dtype)
        small_pages = self.layout.small_pages
        if layout_log is not None:  # tensor parallelism: other ranks replay these layout calls
            self.layout = RecordingLayout(self.layout, layout_log)
        self.enable_prefix_caching = enable_prefix_caching
        self._prefix_caching_wanted = enable_prefix_caching
        self.slots = SlotTable(spec.max_slots)
        self.prefix = PrefixCache()
        self.requests: dict[str, RequestKV] = {}
        self._next_block_id = 0
        self._next_release = 0
        self._chunks_per_block = [2 * len(group.layers) for group in spec.groups]
        self.policies = [policy_for(group, spec.tokens_per_page) for group in spec.groups]  # per kind
        self.evictor = resolve_evictor(evictor, self.policies)  # auto: prefix_subset for sliding kinds
        if self.evictor != "lru":  # LRU is PrefixCache's own order
            self.prefix.evictor = EVICTORS[self.evictor](self.policies)
        self._init_residency()
        self.blocks: BlockSource
        if small_pages:
            self.blocks = LcmBlocks(self, balloon if balloon is not None else KVBalloon(pool), owner)
        elif balloon is not None:
            raise ValueError(f"the {layout!r} layout takes loose chunks: only paged KV shares an LCM balloon")
        else:
            self.blocks = LooseChunks(self)

    # ---- which layers keep KV here -------------------------------------------------------------
    def hold_layers(self, layers) -> None:
        """Keeps KV pages only for `layers` from now on (a peer replica holds the others' KV while this
        one has dropped their weights: KunServe). Only while no request holds KV: cached prefix blocks
        span every layer, so they are evicted, and prefix caching stays off while some layers are held
        elsewhere (the peers' caches would otherwise diverge)."""
        if self.requests:
            raise RuntimeError(f"{len(self.requests)} requests hold KV: the held layers cannot change now")
        held = frozenset(layers)
        if not held <= set(range(self.spec.num_layers)):
            raise ValueError(f"layers {sorted(held)} are not all layers of this model")
        while self.prefix.evictable:
            self._deflate_block(self.prefix.evict_oldest())
        self.layout.held_layers = held
        self._chunks_per_block = [2 * sum(layer in held for layer in group.layers) for group in self.spec.groups]
        self.blocks.resize(self._chunks_per_block)
        self.enable_prefix_caching = self._prefix_caching_wanted and len(held) == self.spec.num_layers

    @property
    def held_layers(self) -> frozenset[int]:
        return self.layout.held_layers

    # ---- queries -------------------------------------------------------------------------------
    def layer_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.layout.layer_caches()

    def slot_of(self, request_id: str) -> int:
        return self.slots.slot_of[request_id]

    @property
    def num_free_slots(self) -> int:
        return self.spec.max_slots - self.slots.num_used

    def num_used_chunks(self) -> int:
        """Chunks the kv balloon holds for live requests (not counting evictable cached blocks)."""
        return self.blocks.used()

    def num_available_chunks(self, holding: Sequence[KVBlock] = ()) -> int:
        """Chunks a new allocation could get: free, evictable cache, and what other balloons give back,
        once the cached blocks in `holding` are held (a prefix hit pins them: they stop being room).
        The one measure of room: admission, preemption and the step's workspace check all use it."""
        return self.blocks.available(holding)

    def num_cached_chunks(self) -> int:
        """Chunks the kv balloon holds only for evictable cached blocks (paged: whole large pages)."""
        return self.blocks.cached()

    def kind_telemetry(self):
        """Per layer-group kind: bytes held, used and internally fragmented ({} for loose chunks)."""
        return self.blocks.telemetry()

    def _pool_available(self) -> int:
        return self.pool.num_obtainable(KV_CLIENT)

    def _pages_needed(self, group: int, num_tokens: int) -> range:
        """Page indices a request with `num_tokens` tokens must have mapped in this group."""
        return self.policies[group].resident_pages(num_tokens)

    def chunks_to_grow(self, request_id: str | None, num_tokens: int, offloaded: Sequence[int] = ()) -> int:
        """Device chunks that growing `request_id` (None: a new request whose layers `offloaded`
        live on the host) to `num_tokens` tokens would take."""
        state = self.requests.get(request_id) if request_id is not None else None
        layered = offloaded or (state is not None and HOST in state.residency)
        total = 0
        missing_per_group = []
        for group in range(len(self.spec.groups)):
            have = state.blocks[group] if state else []
            needed = self._pages_needed(group, num_tokens)
            missing = sum(1 for page in needed if page >= len(have) or have[page] is None)
            missing_per_group.append(missing)
            if layered:
                total += missing * self._device_chunks_per_page(group, state.residency if state else None, offloaded)
        return total if layered else self.blocks.chunks_for(missing_per_group)

    def can_grow(self, request_id: str | None, num_tokens: int) -> bool:
        """Whether `grow` would succeed now (engine/cooperative/kv.py asks every stage before growing)."""
        return self.chunks_to_grow(request_id, num_tokens) <= self.num_available_chunks()

    # ---- admission and growth ------------------------------------------------------------------
    def admit(self, request_id: str, token_ids: Sequence[int], offloaded: Sequence[int] = ()) -> int:
        """Gives a new request a slot and maps its cached prefix pages (shared, not copied). The
        layers in `offloaded` keep their new pages on the host (cached prefix pages stay shared).

        Returns the number of prompt tokens whose KV is already there."""
        if request_id in self.requests:
            raise ValueError(f"request {request_id} is already in the KV cache")
        num_cached = self.match_prefix(token_ids)
        slot = self.slots.assign(request_id)
        if offloaded:
            self._check_all_layers_held()
        state = self._new_state(request_id)
        for layer in offloaded:
            state.residency[layer] = HOST
        self._map_hit(state, slot, token_ids, num_cached)
        state.num_tokens = num_cached
        self._drop_out_of_window(state)
        return num_cached

    def grow(self, request_id: str, num_tokens: int) -> bool:
        """Maps pages so the request can hold `num_tokens` tokens. False (and no change) if the
        memory is not there."""
        state = self.requests[request_id]
        if num_tokens > self.spec.max_len:
            raise ValueError(f"{num_tokens} tokens exceed the slot length {self.spec.max_len}")
        wanted = []
        for group in range(len(self.spec.groups)):
            pages = state.blocks[group]
            for page in self._pages_needed(group, num_tokens):
                if page >= len(pages) or pages[page] is None:
                    wanted.append((group, page))
        if not wanted:
            return True
        layered = HOST in state.residency  # some layers live on the host (layer-wise offloading)
        if not layered and self.host_tier is None:
            taken = self.blocks.take([group for group, _ in wanted])
            if taken is None:
                return False
            slot = self.slot_of(request_id)
            for (group, page), chunks in zip(wanted, taken, strict=True):
                pages = state.blocks[group]
                pages.extend([None] * (page + 1 - len(pages)))
                pages[page] = self._block_of(group, chunks)
                self.layout.map_block(slot, page, pages[page])
            return True
        num_chunks = sum(self._device_chunks_per_page(group, state.residency, ()) if layered
                         else self._chunks_per_block[group] for group, _ in wanted)
        host_pages = []
        for group, page in wanted:
            host = self._allocate_host_pages(state, group, page)
            if host is None:
                for _, _, allocated in host_pages:
                    self.layout.release_host(self.host_buffer, [slot for _, pair in allocated for slot in pair])
                return False
            host_pages.append((group, page, host))
        chunks = self._take_chunks(num_chunks)
        if chunks is None:
            for _, _, allocated in host_pages:
                self.layout.release_host(self.host_buffer, [slot for _, pair in allocated for slot in pair])
            return False
        tier_chunks = []
        if self.host_tier is not None:
            num_tier = sum(self._host_chunks_per_page(group, state.residency) for group, _ in wanted)
            if num_tier > self.host_tier.num_free:
                self.pool.deflate(KV_CLIENT, chunks)
                return False
            tier_chunks = self.host_tier.allocate(num_tier)
        slot = self.slot_of(request_id)
        for group, page, host in host_pages:
            block = self._new_block(group, chunks, state.residency if layered else None, tier_chunks)
            pages = state.blocks[group]
            pages.extend([None] * (page + 1 - len(pages)))
            pages[page] = block
            for layer, pair in host:
                state.host_pages[(layer, page)] = pair
            self.layout.map_block(slot, page, block)
        return True

    def commit(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        """Records that the first `num_tokens` tokens' K/V are stored: full pages become shareable
        and pages that slid out of every query's window are released."""
        state = self.requests[request_id]
        state.num_tokens = num_tokens
        if self.enable_prefix_caching:
            self._share_full_pages(state, token_ids)
        self._drop_out_of_window(state)

    def free(self, request_id: str) -> None:
        """Releases everything the request holds (finished, aborted, or preempted to recompute)."""
        state = self.requests.pop(request_id)
        self.prefix.current_release = state.release
        if state.is_swapped:
            host_slots = [slot for group in state.host_slots for page in group if page for slot in page]
            self.layout.release_host(self.host_buffer, host_slots)
            return
        slot = self.slot_of(request_id)
        for group, pages in enumerate(state.blocks):
            for page, block in enumerate(pages):
                if block is not None:
                    self.layout.unmap_block(slot, page, block)
                    self._release(block)
                    self._free_host_pages(state, group, page)
        self._release_slot(request_id)

    # ---- internals -----------------------------------------------------------------------------
    def _new_state(self, request_id: str) -> RequestKV:
        self._next_release += 1
        state = RequestKV(request_id, blocks=[[] for _ in self.spec.groups],
                          residency=[DEVICE] * self.spec.num_layers, release=self._next_release)
        self.requests[request_id] = state
        return state

    def _take_chunks(self, num_chunks: int) -> list | None:
        """Chunks from: free pool chunks, then our own evictable cached blocks, then what the pool
        reclaims from other balloons. None (and nothing taken) if they do not add up."""
        if num_chunks == 0:
            return []
        if num_chunks > self.num_available_chunks():
            return None
        # free chunks KV may take now (a static split caps KV at its share, whatever else is free)
        free_now = min(num_chunks, self.pool.num_free(), self.pool.num_obtainable(KV_CLIENT))
        chunks = self.pool.inflate(KV_CLIENT, free_now) if free_now else []
        while len(chunks) < num_chunks and self.prefix.evictable:
            evicted = self.prefix.evict_oldest()
            self.layout.block_freed(evicted)  # its chunks now back a new block
            chunks.extend(evicted.chunks)
        if len(chunks) > num_chunks:
            self.pool.deflate(KV_CLIENT, chunks[num_chunks:])
            del chunks[num_chunks:]
        if len(chunks) < num_chunks:
            try:
                chunks.extend(self.pool.inflate(KV_CLIENT, num_chunks - len(chunks)))
            except PoolExhausted:
                self.pool.deflate(KV_CLIENT, chunks)
                return None
        chunks.reverse()  # _new_block pops from the end: keep ascending chunk order per block
        return chunks

    def _block_of(self, group: int, taken: TakenBlock) -> KVBlock:
        chunks, small_page = taken
        block = KVBlock(self._next_block_id, group, chunks, ref_count=1, small_page=small_page)
        self._next_block_id += 1
        return block

    def _new_block(self, group: int, chunks: list, residency: list[str] | None = None,
                   tier_chunks: list | None = None) -> KVBlock:
        """A block from `chunks` (popped). At the chunk positions of layers living on the host: a
        host-tier chunk (in place) or None (the page is in the host buffer)."""
        if residency is None:
            taken = [chunks.pop() for _ in range(self._chunks_per_block[group])]
        else:
            taken = [chunks.pop() if residency[layer] == DEVICE else (tier_chunks.pop() if tier_chunks else None)
                     for layer in self.spec.groups[group].layers for _ in range(2)]
        block = KVBlock(self._next_block_id, group, taken, ref_count=1)
        self._next_block_id += 1
        return block

    def _release(self, block: KVBlock) -> None:
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.block_hash is not None:
            self.prefix.park(block)
            self.blocks.parked(block, True)
        else:
            self._deflate_block(block)

    def _deflate_block(self, block: KVBlock) -> None:
        self.blocks.give_back(block)
        self.layout.block_freed(block)

    def _release_slot(self, request_id: str) -> None:
        hole, moved = self.slots.release(request_id)
        if moved is None:
            return
        last = self.slots.num_used  # the moved request's old slot
        for pages in self.requests[moved].blocks:
            for page, block in enumerate(pages):
                if block is not None:
                    self.layout.move_block(block, last, hole, page)

    def _drop_out_of_window(self, state: RequestKV) -> None:
        if state.is_swapped:
            return
        slot = self.slot_of(state.request_id)
        self.prefix.current_release = state.release
        for group, spec_group in enumerate(self.spec.groups):
            if spec_group.sliding_window is None:
                continue
            first_needed = self._pages_needed(group, max(state.num_tokens, 1)).start
            pages = state.blocks[group]
            for page in range(min(first_needed, len(pages))):
                if pages[page] is not None:
                    self.layout.unmap_block(slot, page, pages[page])
                    self._release(pages[page])
                    self._free_host_pages(state, group, page)
                    pages[page] = None

    def close(self) -> None:
        for request_id in list(self.requests):
            self.free(request_id)
        while self.prefix.evictable:
            self._deflate_block(self.prefix.evict_oldest())
        self.layout.close()
        self.blocks.close()
        if self.host_tier is not None:
            self.host_tier.close()
