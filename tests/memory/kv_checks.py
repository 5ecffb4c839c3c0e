"""Invariants of a KVCacheManager that any test can assert after any operation."""

from __future__ import annotations

from memory.kv import KVCacheManager
from memory.kv.invariants import mapping_violations


def assert_mappings_match_blocks(kv: KVCacheManager) -> None:
    """Every slot's pages map exactly its request's chunks (memory/kv/invariants.py). A stale mapping here is what
    a later `map_block` trips over ("page N is already mapped")."""
    assert not mapping_violations(kv, limit=3), mapping_violations(kv, limit=3)
