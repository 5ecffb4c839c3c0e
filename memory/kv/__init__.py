"""The KV cache on virtual tensors: spec, torch-free block bookkeeping, layouts, and the manager."""

from memory.kv.blocks import KVBlock, PrefixCache, SlotTable, chain_hash, prefix_hashes
from memory.kv.manager import KV_CLIENT, KVCacheManager, RequestKV
from memory.kv.spec import KVCacheSpec, LayerGroup

__all__ = [
    "KV_CLIENT", "KVBlock", "KVCacheManager", "KVCacheSpec", "LayerGroup", "PrefixCache",
    "RequestKV", "SlotTable", "chain_hash", "prefix_hashes",
]
