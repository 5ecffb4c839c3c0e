"""Shape of a model's KV cache, as the memory layer needs it (no model code here)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerGroup:
    """Layers of one attention kind that share a page size and a cache policy (Jenga's groups)."""

    layers: tuple[int, ...]
    sliding_window: int | None  # None: full attention; else keys older than the window are dropped

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a layer group needs at least one layer")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError("sliding_window must be >= 1")


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype_bytes: int  # bytes per element
    groups: tuple[LayerGroup, ...]
    max_slots: int  # concurrently resident requests
    max_len: int  # tokens per slot (a multiple of tokens_per_page)
    tokens_per_page: int

    def __post_init__(self) -> None:
        layers = sorted(layer for group in self.groups for layer in group.layers)
        if layers != list(range(self.num_layers)):
            raise ValueError("layer groups must cover every layer exactly once")
        if self.max_len % self.tokens_per_page:
            raise ValueError("max_len must be a multiple of tokens_per_page")
        if self.max_slots < 1 or self.tokens_per_page < 1:
            raise ValueError("max_slots and tokens_per_page must be >= 1")

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K (or of V) one token takes in one layer."""
        return self.num_kv_heads * self.head_dim * self.dtype_bytes

    @property
    def page_bytes(self) -> int:
        """One page: `tokens_per_page` tokens of K (or V) of one layer; the pool's chunk size."""
        return self.tokens_per_page * self.bytes_per_token

    @property
    def pages_per_slot(self) -> int:
        return self.max_len // self.tokens_per_page

    def num_pages(self, num_tokens: int) -> int:
        return -(-num_tokens // self.tokens_per_page)

    @staticmethod
    def group_layers(layer_windows: list[int | None]) -> tuple[LayerGroup, ...]:
        """Groups layers by attention kind, preserving layer order inside each group."""
        by_window: dict[int | None, list[int]] = {}
        for layer, window in enumerate(layer_windows):
            by_window.setdefault(window, []).append(layer)
        return tuple(LayerGroup(tuple(layers), window) for window, layers in by_window.items())
