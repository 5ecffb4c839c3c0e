"""Staging's write-back copies only the token rows a step wrote: a decode sends one row per staged page
back to the host (not the page), a prefill chunk its rows; rows it did not write keep the host's copy even
when the staging chunk holds something else there; the bytes counted are those rows'."""

from __future__ import annotations

import pytest
import torch

from engine.core.layer_staging import STAGING_CLIENT, InlineCopies, LayerStager, StepSpan, staging_plan
from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup

PAGE_TOKENS, HEAD_DIM, LAYERS = 16, 64, 3  # fp32, one head: 4 KiB pages


@pytest.fixture
def kv():
    backend = create_backend("host")
    spec = KVCacheSpec(num_layers=LAYERS, num_kv_heads=1, head_dim=HEAD_DIM, dtype_bytes=4,
                       groups=(LayerGroup(tuple(range(LAYERS)), None),), max_slots=2, max_len=PAGE_TOKENS * 4,
                       tokens_per_page=PAGE_TOKENS)
    host_buffer = HostBuffer(64 * spec.page_bytes, spec.page_bytes)
    pool = ElasticPool(backend, 64 * spec.page_bytes, spec.page_bytes, host_buffer=host_buffer)
    pool.register(STAGING_CLIENT)
    manager = KVCacheManager(spec, pool, torch.float32, host_buffer=host_buffer)
    yield manager
    manager.close()
    backend.close()


def _host_rows(kv: KVCacheManager, request_id: str, layer: int, page: int, which: int) -> torch.Tensor:
    slot = kv.requests[request_id].host_pages[(layer, page)][which]
    return kv.host_buffer.view(slot).view(torch.float32).view(PAGE_TOKENS, HEAD_DIM)[:, 0]


def _step(kv: KVCacheManager, span: StepSpan, value: float) -> LayerStager:
    """Runs the stager over every layer as a step would: the "attention" writes `value` into the rows
    [span.start, span.end) of each staged page, and scribbles 99 on row 0 (a row the step does not write)."""
    stager = LayerStager(kv.layout, kv.host_buffer, kv.pool, staging_plan(kv, [span]), InlineCopies(), PAGE_TOKENS)
    try:
        for layer in range(LAYERS):
            stager.before(layer)
            for copy in stager.plan[layer]:
                for view in kv.layout.layer_page_views(layer, copy.slot, copy.page):
                    rows = view.view(torch.float32).view(PAGE_TOKENS, HEAD_DIM)
                    first = copy.page * PAGE_TOKENS
                    rows[max(span.start - first, 0): max(span.end - first, 0)] = value
                    if span.start > first:
                        rows[0] = 99.0
            stager.after(layer)
    finally:
        stager.close()
    return stager


def test_write_back_sends_only_the_rows_the_step_wrote(kv):
    kv.admit("a", [1] * 20, offloaded=(1, 2))
    assert kv.grow("a", 20)
    slot = kv.slot_of("a")
    prefill = _step(kv, StepSpan("a", slot, 0, 20), 5.0)  # a prefill chunk: 16 rows of page 0, 4 of page 1
    row_bytes = kv.spec.page_bytes // PAGE_TOKENS
    assert prefill.bytes_written_back == 2 * 2 * 20 * row_bytes  # 2 layers x (K, V) x 20 rows
    kv.commit("a", [1] * 20, 20)
    assert kv.grow("a", 21)
    decode = _step(kv, StepSpan("a", slot, 20, 21), 7.0)  # a decode: row 4 of page 1
    assert decode.bytes_fetched == 2 * 2 * 2 * kv.spec.page_bytes  # both pages of both layers are read
    assert decode.bytes_written_back == 2 * 2 * row_bytes  # but one row of each goes back
    for layer in (1, 2):
        for which in (0, 1):
            page0, page1 = _host_rows(kv, "a", layer, 0, which), _host_rows(kv, "a", layer, 1, which)
            assert torch.equal(page0, torch.full((PAGE_TOKENS,), 5.0))  # the decode's scribble stayed on the device
            assert page1[:4].tolist() == [5.0] * 4 and page1[4] == 7.0
    kv.free("a")
    assert kv.host_buffer.used_bytes == 0 and kv.pool.num_held(STAGING_CLIENT) == 0
