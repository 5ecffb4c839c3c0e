"""KV layouts: one ABC, a registry that memory/ fills with its own layout only, explicit registration above
(that no module registers anything when imported is checked for every module by tests/test_import_graph.py)."""

from __future__ import annotations

import pytest
import torch

from memory import ElasticPool, create_backend
from memory.kv import (
    KVCacheManager,
    KVCacheSpec,
    KVLayout,
    LayerGroup,
    available_layouts,
    create_layout,
    register_layout,
)
from memory.kv.contiguous import ContiguousLayout
from memory.kv.mirror import RecordingLayout


def _spec() -> KVCacheSpec:
    """2 MiB pages (the sim backend's granularity): 1,024 tokens x 8 KV heads x 128 x bf16."""
    return KVCacheSpec(num_layers=2, num_kv_heads=8, head_dim=128, dtype_bytes=2, groups=(LayerGroup((0, 1), None),),
                       max_slots=2, max_len=2048, tokens_per_page=1024)


def test_register_layout_checks_the_class_and_the_name():
    class Other(ContiguousLayout):
        name = "contiguous"

    with pytest.raises(TypeError):
        register_layout(dict)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_layout(Other)
    register_layout(ContiguousLayout)  # the same class again: nothing happens
    assert {"contiguous", "paged"} <= set(available_layouts())
    with pytest.raises(KeyError, match="unknown KV layout 'tree'"):
        create_layout("tree", _spec(), create_backend("sim"), torch.bfloat16)


def test_the_simulators_layout_is_registered_explicitly_and_decides_like_contiguous():
    from loadtest.sim.executor import BookkeepingLayout

    register_layout(BookkeepingLayout)
    blocks = {}
    for name in ("contiguous", "bookkeeping"):
        spec = _spec()
        pool = ElasticPool(create_backend("sim"), 64 * spec.page_bytes, spec.page_bytes)
        manager = KVCacheManager(spec, pool, torch.bfloat16, layout=name, enable_prefix_caching=False)
        assert isinstance(manager.layout, KVLayout) and manager.layout.name == name
        for request_id, num_tokens in (("a", 1500), ("b", 10)):
            manager.admit(request_id, list(range(num_tokens)))
            assert manager.grow(request_id, num_tokens)
        manager.free("a")
        blocks[name] = (manager.slot_of("b"), pool.num_held("kv"))
        manager.close()
    assert blocks["contiguous"] == blocks["bookkeeping"] == (0, 4)  # b moved to slot 0: 1 page x 2 layers x K, V


def test_recording_layout_forwards_every_call_and_logs_the_placing_ones():
    spec = _spec()
    pool = ElasticPool(create_backend("sim"), 64 * spec.page_bytes, spec.page_bytes)
    log: list = []
    manager = KVCacheManager(spec, pool, torch.bfloat16, layout_log=log, enable_prefix_caching=False)
    assert isinstance(manager.layout, RecordingLayout)
    manager.admit("a", list(range(1500)))
    assert manager.grow("a", 1500)
    manager.free("a")
    assert [entry[0] for entry in log] == ["map", "map", "unmap", "free", "unmap", "free"]
    assert len(manager.layer_caches()) == 2
    manager.close()
