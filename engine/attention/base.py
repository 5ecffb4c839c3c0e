"""The interface every attention backend implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from engine.core.forward_batch import ForwardBatch


@dataclass(frozen=True)
class LayerAttentionSpec:
    num_heads: int  # query heads on this rank
    num_kv_heads: int  # key/value heads on this rank
    head_dim: int
    sliding_window: int | None  # None: full attention; else a token attends to the last `window` tokens

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ValueError("query heads must be a multiple of key/value heads")


class AttentionBackend(ABC):
    @abstractmethod
    def forward(
        self,
        spec: LayerAttentionSpec,
        q: torch.Tensor,  # [T, num_heads, head_dim], RoPE applied
        k: torch.Tensor,  # [T, num_kv_heads, head_dim], RoPE applied
        v: torch.Tensor,  # [T, num_kv_heads, head_dim]
        key_cache: torch.Tensor,  # [max_slots, max_len, num_kv_heads, head_dim]
        value_cache: torch.Tensor,
        batch: ForwardBatch,
        out: torch.Tensor,  # [T, num_heads, head_dim], written in place
    ) -> None:
        """Store k/v at (token_slots, positions), then attend every query to its own context."""
