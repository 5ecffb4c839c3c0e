"""Random sequences of inflate/deflate/map/unmap/alias/move/write/read/trim against a model.

Checked after every step: the pool accounts for every chunk and never has more than its budget
physically alive (the memfd's allocated bytes say so too); each chunk is owned by exactly one client
or is free; num_mappings equals the places that map the chunk; only unmapped chunks are deflated
or released; every mapped page reads what was last written through any alias of its chunk, and
every unmapped page reads zeros.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from memory import ElasticPool, PoolExhausted, VirtualTensor, create_backend

PAGE = os.sysconf("SC_PAGE_SIZE")
NUM_CHUNKS = 8
NUM_PAGES = 5
CLIENTS = ("kv", "activations")

clients = st.sampled_from(CLIENTS)
tensors = st.integers(0, 1)
pages = st.integers(0, NUM_PAGES - 1)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.backend = create_backend("host")
        self.pool = ElasticPool(self.backend, NUM_CHUNKS * PAGE, PAGE)
        self.held: dict[str, list] = {client: [] for client in CLIENTS}
        for client in CLIENTS:
            self.pool.register(client, self._reclaimer(client), self._reclaimable(client))
        self.tensors = [VirtualTensor(self.backend, (NUM_PAGES, PAGE), torch.uint8, PAGE) for _ in range(2)]
        self.content: dict[int, int] = {}  # chunk_id -> the byte every position of it holds
        self.seen_ids: set[int] = set()

    def teardown(self) -> None:
        for tensor in self.tensors:
            tensor.close()
        self.pool.close()
        self.backend.close()

    # ---- the clients' side of reclaim --------------------------------------------------------
    def _unmapped(self, client: str) -> list:
        return [chunk for chunk in self.held[client] if chunk.num_mappings == 0]

    def _reclaimable(self, client: str):
        return lambda: len(self._unmapped(client))

    def _reclaimer(self, client: str):
        def reclaim(num: int) -> int:
            given = self._unmapped(client)[:num]
            self.pool.deflate(client, given)
            self.held[client] = [chunk for chunk in self.held[client] if chunk not in given]
            return len(given)
        return reclaim

    # ---- rules ---------------------------------------------------------------------------------
    @rule(client=clients, num=st.integers(0, 5))
    def inflate(self, client: str, num: int) -> None:
        other = CLIENTS[1 - CLIENTS.index(client)]
        could = self.pool.num_free() + len(self._unmapped(other))
        assert self.pool.can_inflate(client, num) == (num <= could)
        assert self.pool.num_obtainable(client) == could
        before = {name: list(chunks) for name, chunks in self.held.items()}
        if num > could:
            with pytest.raises(PoolExhausted) as info:
                self.pool.inflate(client, num)
            assert info.value.available == self.pool.num_free()
            assert self.held == before  # all or nothing, and nobody was asked in vain
            return
        chunks = self.pool.inflate(client, num)
        assert len(chunks) == num and all(chunk.owner == client for chunk in chunks)
        for chunk in chunks:
            if chunk.chunk_id not in self.seen_ids:
                self.seen_ids.add(chunk.chunk_id)
                self.content[chunk.chunk_id] = 0  # new physical memory reads zeros
        self.held[client] += chunks

    @rule(client=clients, num=st.integers(1, 4))
    def deflate(self, client: str, num: int) -> None:
        mapped = [chunk for chunk in self.held[client] if chunk.num_mappings]
        if mapped:
            with pytest.raises(ValueError, match="still mapped"):
                self.pool.deflate(client, self._unmapped(client)[:1] + mapped[:1])
        given = self._unmapped(client)[:num]
        self.pool.deflate(client, given)
        self.held[client] = [chunk for chunk in self.held[client] if chunk not in given]
        assert all(chunk.owner is None for chunk in given)

    @rule(tensor=tensors, page=pages, client=clients, pick=st.integers(0, 100))
    def map_or_alias(self, tensor: int, page: int, client: str, pick: int) -> None:
        vt = self.tensors[tensor]
        if vt.is_mapped(page) or not self.held[client]:
            return
        chunk = self.held[client][pick % len(self.held[client])]
        mappings = chunk.num_mappings
        vt.map_page(page, chunk)
        assert chunk.num_mappings == mappings + 1

    @rule(tensor=tensors, page=pages)
    def unmap(self, tensor: int, page: int) -> None:
        vt = self.tensors[tensor]
        if not vt.is_mapped(page):
            with pytest.raises(ValueError, match="not mapped"):
                vt.unmap_page(page)
            return
        chunk = vt.chunk_at(page)
        assert vt.unmap_page(page) is chunk and not chunk.is_released

    @rule(tensor=tensors, src=pages, dst=pages)
    def move(self, tensor: int, src: int, dst: int) -> None:
        vt = self.tensors[tensor]
        if not vt.is_mapped(src) or vt.is_mapped(dst):
            return
        chunk = vt.chunk_at(src)
        vt.move_page(src, dst)
        assert vt.chunk_at(dst) is chunk and not vt.is_mapped(src)

    @rule(tensor=tensors, page=pages, value=st.integers(1, 255))
    def write(self, tensor: int, page: int, value: int) -> None:
        vt = self.tensors[tensor]
        if vt.is_mapped(page):
            vt.tensor[page].fill_(value)
            self.content[vt.chunk_at(page).chunk_id] = value

    @rule(keep=st.integers(0, 3))
    def trim(self, keep: int) -> None:
        free_alive = self.pool.num_alive - sum(len(chunks) for chunks in self.held.values())
        assert self.pool.trim(keep) == max(0, free_alive - keep)

    # ---- invariants ----------------------------------------------------------------------------
    @invariant()
    def every_chunk_is_accounted_for(self) -> None:
        held = sum(len(chunks) for chunks in self.held.values())
        assert [self.pool.num_held(client) for client in CLIENTS] == [len(self.held[c]) for c in CLIENTS]
        assert held + self.pool.num_free() == NUM_CHUNKS
        assert held <= self.pool.num_alive <= NUM_CHUNKS
        assert self.backend.num_live_chunks == self.pool.num_alive
        assert self.backend.physical_bytes() == self.pool.num_alive * PAGE

    @invariant()
    def ownership_is_exclusive_and_mappings_are_counted(self) -> None:
        ids = [chunk.chunk_id for chunks in self.held.values() for chunk in chunks]
        assert len(ids) == len(set(ids))
        places: dict[int, int] = {}
        for vt in self.tensors:
            for page in vt.mapped_pages():
                places[vt.chunk_at(page).chunk_id] = places.get(vt.chunk_at(page).chunk_id, 0) + 1
        for client, chunks in self.held.items():
            for chunk in chunks:
                assert chunk.owner == client and not chunk.is_released
                assert chunk.num_mappings == places.get(chunk.chunk_id, 0)
        assert set(places) <= set(ids)  # only held chunks are mapped

    @invariant()
    def data_reads_back(self) -> None:
        for vt in self.tensors:
            for page in range(NUM_PAGES):
                chunk = vt.chunk_at(page)
                expected = 0 if chunk is None else self.content[chunk.chunk_id]
                row = vt.tensor[page]
                assert int(row.min()) == expected and int(row.max()) == expected


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
