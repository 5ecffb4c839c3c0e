"""The KV cache on virtual tensors: spec, torch-free block bookkeeping, layouts, and the manager."""

from memory.kv.blocks import KVBlock, PrefixCache, SlotTable, chain_hash, prefix_hashes
from memory.kv.layout import KVLayout
from memory.kv.manager import KV_CLIENT, KVCacheManager, RequestKV
from memory.kv.registry import available_layouts, create_layout, register_layout
from memory.kv.spec import KVCacheSpec, LayerGroup

__all__ = [
    "KV_CLIENT", "KVBlock", "KVCacheManager", "KVCacheSpec", "KVLayout", "LayerGroup", "PrefixCache",
    "RequestKV", "SlotTable", "available_layouts", "chain_hash", "create_layout", "prefix_hashes",
    "register_layout",
]
