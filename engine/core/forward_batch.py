"""What the model needs to run one step: token ids, positions and attention metadata, as tensors.

The runner builds one `ForwardBatch` per step from the scheduler's plan. Tokens are ordered decode
first (one per decoding request), then each prefill chunk's tokens in order.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class PrefillChunk:
    slot: int  # KV slot of the request
    start_position: int  # tokens already in the KV cache before this chunk
    num_tokens: int  # tokens computed in this chunk
    token_offset: int  # index of the chunk's first token in the flat token dimension


@dataclass(frozen=True)
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64, decode tokens first, then prefill chunks
    positions: torch.Tensor  # [T] int64, absolute position of each token
    token_slots: torch.Tensor  # [T] int64, KV slot each token's K/V is written to
    num_decode_tokens: int  # the first num_decode_tokens tokens are decodes, one per request
    decode_slots: torch.Tensor  # [num_decode] int64, slot per decode (ascending)
    decode_context_lens: torch.Tensor  # [num_decode] int64, KV length including the new token
    decode_slots_are_prefix: bool  # decode_slots == arange(num_decode): attend over one slice
    max_decode_context_len: int  # longest decode context, bounds the dense view's length
    prefills: tuple[PrefillChunk, ...]  # one per prefilling request, in token order
    logits_indices: torch.Tensor  # [N] int64, rows whose logits are sampled (last token of each)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @cached_property
    def prefill_arrays(self) -> torch.Tensor:
        """[4, num_prefills] int64 on the CPU: each chunk's slot, start position, token offset and token count
        (the native prefill kernel's arguments), made once per batch however many layers read them."""
        chunks = self.prefills
        return torch.tensor([[c.slot for c in chunks], [c.start_position for c in chunks],
                             [c.token_offset for c in chunks], [c.num_tokens for c in chunks]], dtype=torch.int64)
