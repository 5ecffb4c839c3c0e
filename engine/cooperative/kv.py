"""The scheduler's KV manager while two replicas run as a pipeline: each stage's manager keeps the KV of
the layers its replica holds, and both see the same calls in the same order, so a request gets the same
slot and page numbers on both (the managers are deterministic; see memory/kv/manager.py).

The scheduler asks one question with one number ("does growing this request plus the step's workspace
fit?"); here it is answered for the tighter stage: a request needs max over stages chunks and the pair
has min over stages chunks available, so a plan that fits here fits on both. Prefix caching is off on
both managers while they hold part of the layers, and preempted requests recompute (no swap), so no
stage's cache can diverge from the other's. No layer is offloaded to the host either (EngineConfig refuses
`kv_offload: layerwise` with parameter dropping), so the managers' `offloaded` parameters are absent here.
"""

from __future__ import annotations

from collections.abc import Sequence

from memory.kv import KVBlock, KVCacheManager


class PipelineKV:
    """The subset of KVCacheManager the Scheduler uses, over every stage's manager at once."""

    def __init__(self, stages: Sequence[KVCacheManager]):
        if len(stages) < 2:
            raise ValueError("a pipeline has at least two stages")
        self.stages = tuple(stages)

    def chunks_to_grow(self, request_id: str | None, num_tokens: int) -> int:
        return max(kv.chunks_to_grow(request_id, num_tokens) for kv in self.stages)

    def num_available_chunks(self, holding: Sequence[KVBlock] = ()) -> int:
        return min(kv.num_available_chunks(holding) for kv in self.stages)

    def num_used_chunks(self) -> int:
        return sum(kv.num_used_chunks() for kv in self.stages)

    def has_host_pages(self, request_id: str) -> bool:
        return False  # no layer-wise offload in a pipeline (EngineConfig refuses the pair)

    def can_grow(self, request_id: str | None, num_tokens: int) -> bool:
        return all(kv.can_grow(request_id, num_tokens) for kv in self.stages)

    @property
    def num_free_slots(self) -> int:
        return min(kv.num_free_slots for kv in self.stages)

    def match_prefix(self, token_ids: Sequence[int]) -> int:
        return 0  # prefix caching is off while layers are split across replicas

    def hit_blocks(self, token_ids: Sequence[int], num_cached: int) -> list[KVBlock]:
        return []  # no prefix hit, so no cached block to hold

    def admit(self, request_id: str, token_ids: Sequence[int]) -> int:
        for kv in self.stages:
            kv.admit(request_id, token_ids)
        return 0

    def grow(self, request_id: str, num_tokens: int) -> bool:
        if not self.can_grow(request_id, num_tokens):
            return False  # checked first: a stage that grew alone would leave the pair out of step
        for kv in self.stages:
            if not kv.grow(request_id, num_tokens):
                raise RuntimeError(f"stage KV refused to grow {request_id} after saying it could")
        return True

    def commit(self, request_id: str, token_ids: Sequence[int], num_tokens: int) -> None:
        for kv in self.stages:
            kv.commit(request_id, token_ids, num_tokens)

    def free(self, request_id: str) -> None:
        for kv in self.stages:
            kv.free(request_id)

    def slot_of(self, request_id: str) -> int:
        slots = {kv.slot_of(request_id) for kv in self.stages}
        if len(slots) != 1:
            raise RuntimeError(f"stages disagree on the slot of {request_id}: {sorted(slots)}")
        return slots.pop()

    def reserve_import(self, request_id: str, num_tokens: int) -> bool:
        for index, kv in enumerate(self.stages):
            if not kv.reserve_import(request_id, num_tokens):
                for reserved in self.stages[:index]:
                    reserved.free(request_id)
                return False
        return True

    def write_kv(self, request_id: str, start: int, layers) -> None:
        for kv in self.stages:  # each writes the layers it holds
            kv.write_kv(request_id, start, layers)

    def finish_import(self, request_id: str, num_tokens: int) -> None:
        for kv in self.stages:
            kv.finish_import(request_id, num_tokens)

    def can_fork(self, request_id: str) -> bool:
        # n > 1 while pipelined: the choices run as ordinary requests (each prefills the prompt); the pipeline
        # runner samples one row per request, not a fork's extra rows
        return False

    def chunks_to_fork(self, num_tokens: int) -> int:
        return max(kv.chunks_to_fork(num_tokens) for kv in self.stages)

    def fork(self, parent_id: str, child_id: str) -> bool:
        return False  # see can_fork

    def can_swap_out(self, request_id: str) -> bool:
        return False  # a preempted request recomputes: its KV is spread over two host buffers otherwise

    def swap_out(self, request_id: str) -> int:
        raise RuntimeError("no request is ever swapped out of a pipeline")

    def chunks_to_swap_in(self, request_id: str) -> int:
        raise RuntimeError("no request is ever swapped out of a pipeline")

    def swap_in(self, request_id: str) -> bool:
        raise RuntimeError("no request is ever swapped out of a pipeline")
