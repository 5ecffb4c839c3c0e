"""Where each running request's KV layers live: the scheduler's layer-wise offloading policy (LayerKV).

`none` keeps every layer of an admitted request on the device (a prompt waits until all of it fits).
`layerwise`:
- admission: a prompt whose whole KV does not fit is admitted with its lowest layers on the device
  and the fewest top layers on the host that make it fit (with the step's staging buffer, which the
  activations balloon lends: 2 x the pages of the two largest consecutive offloaded layers);
- demotion: under pressure, before anyone is preempted, layers of the requests with the most TPOT
  slack move to the host (top layer first);
- promotion: when memory frees, offloaded layers come back, most urgent request first, but only when
  no prompt is waiting or the request is missing its TPOT target (TTFT comes first, as LayerKV argues);
- decode pacing (with a TPOT target): a step decodes requests with host pages only while their fetches
  fit the time the target leaves after the step's compute, least TPOT slack first (one always decodes
  when no resident request does, so everyone progresses); the others sit the step out with their KV where
  it is, and their device layers are what admission demotes to start a waiting prompt (with a TTFT
  target). A prompt thus gets its first token early and decodes at the pace the host link allows, where
  otherwise every decode step would pay every offloaded request's fetch.
Whole-request swap or recompute stays the scheduler's last resort.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from engine.core.layer_staging import staging_chunks
from engine.core.request import Request
from engine.core.slo import SloTargets
from memory.kv import KVCacheManager
from memory.kv.residency import DEVICE, HOST


class NoOffload:
    name = "none"

    def __init__(self, kv: KVCacheManager, slo: SloTargets):
        self.kv = kv

    def staging(self, spans: dict[str, int]) -> int:
        return 0

    def fetch_bytes(self, running: Sequence[Request]) -> int:
        """Bytes a decode step of `running` stages from the host (0: nothing offloaded or in place)."""
        return 0

    def layers_to_offload(self, request: Request, num_cached: int, end: int, need: int,
                          available: int) -> tuple[int, ...] | None:
        """Which layers of a prompt to admit on the host: () if its whole KV (`need` device chunks)
        fits in `available`, None if it must wait."""
        return () if need <= available else None

    def demote(self, num_chunks: int, candidates: Sequence[Request]) -> int:
        return 0

    def decodes_to_defer(self, running: Sequence[Request], budget_bytes: float) -> set[str]:
        """Decoding requests that sit this step out so that the step stages at most `budget_bytes`."""
        return set()

    def make_room(self, request: Request, num_cached: int, end: int, available: int,
                  candidates: Sequence[Request]) -> bool:
        """Demotes layers of `candidates` until the prompt can start with its layers on the host; True if
        that freed all it needs."""
        return False

    def promote(self, running: Sequence[Request], spare_chunks: Callable[[], int], has_waiting: bool) -> int:
        """Brings offloaded layers back within `spare_chunks()`; returns the chunks used."""
        return 0


class LayerwiseOffload(NoOffload):
    name = "layerwise"

    def __init__(self, kv: KVCacheManager, slo: SloTargets):
        super().__init__(kv, slo)
        self.slo = slo
        self.num_demotions = 0
        self.num_promotions = 0
        self.num_partial_admissions = 0  # prompts admitted with layers on the host

    def staging(self, spans: dict[str, int]) -> int:
        """Staging chunks a step computing each request up to `spans[request_id]` tokens needs."""
        if self.kv.host_tier is not None:  # in place: host pages are read where they are
            return 0
        pages = [0] * self.kv.spec.num_layers
        for request_id, end in spans.items():
            state = self.kv.requests[request_id]
            if state.host_pages or HOST in state.residency:
                for layer in range(self.kv.spec.num_layers):
                    pages[layer] += self.kv.num_pages_to_stage(request_id, layer, end)
        return staging_chunks(pages)

    def fetch_bytes(self, running: Sequence[Request]) -> int:
        if self.kv.host_tier is not None:
            return 0
        pages = sum(self.kv.num_pages_to_stage(r.request_id, layer, r.num_computed_tokens + 1)
                    for r in running if self.kv.requests[r.request_id].host_pages
                    for layer in self.kv.layers_with_host_pages(r.request_id))
        return 2 * pages * self.kv.spec.page_bytes

    def layers_to_offload(self, request: Request, num_cached: int, end: int, need: int,
                          available: int) -> tuple[int, ...] | None:
        """The fewest top layers to put on the host so the prompt fits with the staging its first
        chunk needs; None if even all of them on the host do not."""
        if need <= available:
            return ()
        for offloaded, device in self._admissions(request, num_cached, end):
            if device <= available:
                self.num_partial_admissions += 1
                return offloaded
        return None

    def make_room(self, request: Request, num_cached: int, end: int, available: int,
                  candidates: Sequence[Request]) -> bool:
        options = list(self._admissions(request, num_cached, end))
        if len(options) < self.kv.spec.num_layers or options[-1][1] <= available or not candidates:
            return False  # the host buffer cannot take all its layers, or it fits already
        shortfall = options[-1][1] - available
        return self.demote(shortfall, candidates) >= shortfall

    def _admissions(self, request: Request, num_cached: int, end: int):
        """(top layers on the host, device chunks incl. the first chunk's staging) for 1, 2, ... host
        layers, as long as the host buffer holds them."""
        kv, total = self.kv, request.num_tokens + 1
        num_layers = kv.spec.num_layers
        cached_pages = kv.spec.num_pages(num_cached)
        step_pages = kv.spec.num_pages(end) - cached_pages
        for num_host in range(1, num_layers + 1):
            offloaded = tuple(range(num_layers - num_host, num_layers))
            device = kv.chunks_to_grow(None, total, offloaded) - (
                kv.chunks_to_grow(None, num_cached, offloaded) if num_cached else 0)
            host = kv.host_chunks_to_grow(None, total, offloaded) - (
                kv.host_chunks_to_grow(None, num_cached, offloaded) if num_cached else 0)
            if kv.host_buffer is None or host > kv.host_buffer.num_free:
                return
            staging = 0 if kv.host_tier is not None else staging_chunks(
                [step_pages if layer in offloaded else 0 for layer in range(num_layers)])
            yield offloaded, device + staging

    def demote(self, num_chunks: int, candidates: Sequence[Request]) -> int:
        """Moves layers of the requests with the most TPOT slack to the host until `num_chunks`
        device chunks are free; returns how many were freed."""
        freed = 0
        for request in sorted(candidates, key=self.slo.tpot_slack_ms, reverse=True):
            request_id = request.request_id
            device_layers = [layer for layer, where in enumerate(self.kv.requests[request_id].residency)
                             if where == DEVICE]
            for layer in reversed(device_layers[1:]):  # keep one layer: a request all on the host stalls
                if freed >= num_chunks:
                    return freed
                gain = self.kv.chunks_freed_by_demoting(request_id, layer)
                if gain == 0 or gain > self.kv.host_buffer.num_free:
                    continue
                freed += self.kv.demote(request_id, layer)
                self.num_demotions += 1
        return freed

    def decodes_to_defer(self, running: Sequence[Request], budget_bytes: float) -> set[str]:
        """Decodes with host pages, least TPOT slack first, while their fetches fit `budget_bytes`; the rest
        wait. When no resident request decodes, the most urgent offloaded one always does."""
        decoding = [r for r in running if not r.is_prefilling]
        offloaded = [r for r in decoding if self.kv.requests[r.request_id].host_pages]
        must_one = len(offloaded) == len(decoding)
        deferred, used = set(), 0
        for index, request in enumerate(sorted(offloaded, key=self.slo.tpot_slack_ms)):
            num_bytes = self.fetch_bytes([request])
            if used + num_bytes <= budget_bytes or (index == 0 and must_one):
                used += num_bytes
            else:
                deferred.add(request.request_id)
        return deferred

    def promote(self, running: Sequence[Request], spare_chunks: Callable[[], int], has_waiting: bool) -> int:
        """Brings offloaded layers back while the spare chunks last, most urgent request first."""
        if not any(self.kv.requests[r.request_id].residency.count(HOST) or self.kv.requests[r.request_id].host_pages
                   for r in running):
            return 0
        spare, used = spare_chunks(), 0
        if spare <= 0:
            return 0
        for request in sorted(running, key=self.slo.urgency):
            if has_waiting and self.slo.tpot_slack_ms(request) >= 0:
                continue
            for layer in self.kv.layers_with_host_pages(request.request_id):
                need = self.kv.chunks_to_promote(request.request_id, layer)
                if used + need > spare or not self.kv.promote(request.request_id, layer):
                    return used
                used += need
                self.num_promotions += 1
        return used


OFFLOAD_POLICIES = {"none": NoOffload, "layerwise": LayerwiseOffload}

__all__ = ["HOST", "OFFLOAD_POLICIES", "LayerwiseOffload", "NoOffload"]
