"""The KV layouts by name (`kv_layout` in the engine config): where pages sit in virtual memory."""

from __future__ import annotations

from memory.kv.contiguous import ContiguousLayout
from memory.kv.paged import PagedLayout

LAYOUTS = {"contiguous": ContiguousLayout, "paged": PagedLayout}
