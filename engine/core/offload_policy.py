"""Where each running request's KV layers live: the scheduler's layer-wise offloading policy (LayerKV).

`none` keeps every layer of an admitted request on the device (a prompt waits until all of it fits).
`layerwise`:
- admission: a prompt whose whole KV does not fit is admitted with its lowest layers on the device
  and the fewest top layers on the host that make it fit (with the step's staging buffer, which the
  activations balloon lends: 2 x the pages of the two largest consecutive offloaded layers) -- but only
  when that saves its TTFT (with a TTFT target: not already lost) and it can still meet its TPOT target
  (`tpot_feasible`, with a TPOT target): the running batch's paced fetch budget (`tpot_margin` x the
  target, less a decode step) takes its per-step fetch, or a forecast says the memory the running
  requests free as they finish brings it back whole early enough (it is parked until then: its first
  token is out at once, its outputs wait). Otherwise it waits;
- decode pacing (with a TPOT target): a step decodes requests with host pages, least laxity first
  (`SloTargets.laxity_ms`: how long a request may still sit out and meet `tpot_margin` x its target), while
  their fetches add no stall to the step (`fetch_stall_ms`: a layer's copy overlaps one layer's compute);
  a request with no laxity left may stall it up to what `tpot_margin` x the target leaves after the
  compute. The others sit the step out (parked), so resident decodes are not slowed by PCIe. When no
  resident request decodes, the least-laxity offloaded one always does (progress);
- promotion: when memory frees, offloaded layers come back before new prompts are admitted with host
  layers: decodes least laxity first, each made whole or left alone (a fragment more still fetches every
  step), taking the device layers of parked decodes with more laxity when the spare memory alone is
  short (consolidation: memory held as fragments of many parked requests decodes nobody at device speed);
  then prompts still prefilling, most urgent first; the scheduler keeps back what the waiting head needs
  to start with all its layers on the host;
- demotion: under pressure, before anyone is preempted, layers move to the host top layer first: parked
  decodes' first, then a prefilling prompt's own, then those of the requests with the most laxity.
Whole-request swap or recompute stays the scheduler's last resort.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence, Set

from engine.core.layer_staging import staging_chunks
from engine.core.request import Request
from engine.core.slo import SloTargets
from engine.core.step_cost import StepCostModel
from engine.host_split import HostRoom, HostSplit, fewest_host_layers
from memory.kv import KVCacheManager
from memory.kv.residency import DEVICE, HOST


class NoOffload:
    name = "none"

    def __init__(self, kv: KVCacheManager, slo: SloTargets, cost_model: StepCostModel | None = None,
                 tpot_margin: float = 1.0):
        self.kv = kv
        self.slo = slo
        self.cost_model = cost_model or StepCostModel()
        self.margin = tpot_margin

    def staging(self, spans: dict[str, int]) -> int:
        return 0

    def laxity_ms(self, request: Request, step_ms: float) -> float:
        """How long the request may sit out decode steps and meet `tpot_margin` x its TPOT target."""
        return self.slo.laxity_ms(request, step_ms, self.margin)

    def fetch_bytes(self, running: Sequence[Request]) -> int:
        """Bytes a decode step of `running` stages from the host (0: nothing offloaded or in place)."""
        return 0

    def layers_to_offload(self, request: Request, num_cached: int, end: int, need: int,
                          available: int, running: Sequence[Request] = ()) -> tuple[int, ...] | None:
        """Which layers of a prompt to admit on the host: () if its whole KV (`need` device chunks)
        fits in `available`, None if it must wait."""
        return () if need <= available else None

    def layers_to_import(self, num_tokens: int, room: int, available: int) -> tuple[int, ...] | None:
        """Which layers of a migrated request (`num_tokens` tokens, pages reserved for `room`) to import onto
        the host: () if its whole KV fits in `available` device chunks, None if it must be refused."""
        return () if self.kv.chunks_to_grow(None, room) <= available else None

    def admission_reserve(self, num_cached: int, end: int) -> int:
        """Device chunks a prompt needs to start with every layer on the host (its first chunk's staging)."""
        return 0

    def demote(self, num_chunks: int, candidates: Sequence[Request]) -> int:
        return 0

    def decodes_to_defer(self, running: Sequence[Request], compute_ms: float) -> set[str]:
        """Decoding requests that sit out a step whose compute takes `compute_ms` (their fetches would slow it)."""
        return set()

    def make_room(self, request: Request, num_cached: int, end: int, available: int,
                  running: Sequence[Request], parked: Set[str] = frozenset()) -> bool:
        """Demotes layers of running decodes (the policy says whose; `parked`: decodes sitting this step out)
        until the prompt can start with its layers on the host; True if that freed all it needs."""
        return False

    def promote(self, running: Sequence[Request], spare_chunks: Callable[[], int],
                parked: Set[str] = frozenset()) -> int:
        """Brings offloaded layers back within `spare_chunks()` (`parked`: decodes sitting this step out);
        returns the chunks used."""
        return 0


class LayerwiseOffload(NoOffload):
    name = "layerwise"

    def __init__(self, kv: KVCacheManager, slo: SloTargets, cost_model: StepCostModel | None = None,
                 tpot_margin: float = 1.0):
        super().__init__(kv, slo, cost_model, tpot_margin)
        self.num_demotions = 0
        self.num_promotions = 0
        self.num_partial_admissions = 0  # prompts admitted with layers on the host
        self.num_consolidations = 0  # parked requests made whole with other parked requests' device layers
        self.num_held_back = 0  # admissions with host layers refused by the TPOT forecast (a step may count one)

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
        return sum(sum(self.layer_fetch_bytes(r)) for r in running if self.kv.requests[r.request_id].host_pages)

    def layers_to_offload(self, request: Request, num_cached: int, end: int, need: int,
                          available: int, running: Sequence[Request] = ()) -> tuple[int, ...] | None:
        """The fewest top layers to put on the host so the prompt fits with the staging its first
        chunk needs; None if even all of them on the host do not, or its TPOT target cannot absorb them."""
        if need <= available:
            return ()
        for offloaded, device in self._admissions(request, num_cached, end):
            if device <= available:
                if not self.tpot_feasible(request, offloaded, running):
                    self.num_held_back += 1
                    return None
                self.num_partial_admissions += 1
                return offloaded
        return None

    def layers_to_import(self, num_tokens: int, room: int, available: int) -> tuple[int, ...] | None:
        """Admission's rule for a migrated request: the fewest top layers on the host that make its device
        part fit with the staging its next decode needs (every page of its offloaded layers up to that token,
        two consecutive layers at a time), as long as the host holds them (`fewest_host_layers`, the rule the
        cluster's migration policies plan with)."""
        if self.kv.chunks_to_grow(None, room) <= available:
            return ()
        split = fewest_host_layers(self.import_splits(num_tokens, room), available, self.host_room())
        if split is None:
            return None
        num_layers = self.kv.spec.num_layers
        return tuple(range(num_layers - split.num_host_layers, num_layers))

    def import_splits(self, num_tokens: int, room: int) -> Iterator[HostSplit]:
        """A request of `num_tokens` tokens with pages reserved for `room`, with 1, 2, ... of its top layers on
        the host: device chunks, host pages, and the staging its next decode needs when pages are copied in."""
        kv = self.kv
        num_layers = kv.spec.num_layers
        decode_pages = kv.spec.num_pages(num_tokens)
        for num_host in range(1, num_layers + 1):
            offloaded = range(num_layers - num_host, num_layers)
            staging = staging_chunks([0] * (num_layers - num_host) + [decode_pages] * num_host)
            yield HostSplit(num_host, *kv.new_request_split(room, offloaded), staging)

    def host_room(self) -> HostRoom:
        """What this engine's host can still take for offloaded layers, and whether it stages copies."""
        return HostRoom(self.kv.host_room(), staged=self.kv.host_tier is None)

    def admission_reserve(self, num_cached: int, end: int) -> int:
        if self.kv.host_tier is not None:
            return 0
        step_pages = self.kv.spec.num_pages(end) - self.kv.spec.num_pages(num_cached)
        return staging_chunks([step_pages] * self.kv.spec.num_layers)

    def tpot_feasible(self, request: Request, offloaded: Sequence[int], running: Sequence[Request]) -> bool:
        """Whether admitting a prompt with `offloaded` layers on the host is worth it: it saves its TTFT (with
        a TTFT target: its first token, after the prefill ahead of it, is still due in time), and it can still
        decode within `tpot_margin` x its TPOT target: the running batch's fetch budget absorbs its per-step
        fetch, or the memory the resident requests free as they finish (forecast: their remaining tokens x a
        decode step of the requests decoding at device speed) brings it back whole, after the offloaded
        requests already waiting for promotion, early enough that it decodes its outputs in time (parked until
        then). No TPOT condition without a target or in place."""
        if self.kv.host_tier is not None:
            return True  # in place, host layers cost no fetch: nothing to weigh against an earlier start
        kv, cost = self.kv, self.cost_model
        step_ms = self.decode_step_ms(running)
        prefill_left = sum(r.num_tokens - r.num_computed_tokens for r in running if r.is_prefilling)
        first_token_ms = cost.predict_ms(prefill_left + request.num_tokens)
        ttft = self.slo.ttft_target_ms(request)
        if ttft is not None and (self.slo.clock() - request.arrival_time) * 1e3 + first_token_ms > ttft:
            return False  # its TTFT is lost anyway: host layers would cost fetches and promotions for nothing
        target = self.slo.tpot_target_ms(request)
        if target is None:
            return True
        host_chunks = kv.host_chunks_to_grow(None, request.num_tokens + 1, offloaded)
        decoding = [r for r in running if not r.is_prefilling]
        fetch = self.fetch_bytes(decoding) + host_chunks * kv.spec.page_bytes
        if step_ms + cost.fetch_ms(fetch) <= self.margin * target:
            return True
        # the forecast runs over many steps: a decode step of the requests that decode at device speed (the
        # observed TPOTs above include the prefill chunks of the burst now, not the decodes after it)
        resident = sum(1 for r in decoding if not kv.requests[r.request_id].host_pages)
        decode_ms = cost.predict_ms(resident + 1)
        wait_ms = self._promotion_wait_ms(host_chunks, running, decode_ms)
        max_tokens = request.params.max_tokens
        return max(0.0, wait_ms - first_token_ms) + max_tokens * decode_ms <= \
            self.margin * target * max(max_tokens - 1, 1)

    def _promotion_wait_ms(self, num_chunks: int, running: Sequence[Request], step_ms: float) -> float:
        """Forecast: ms until the device has `num_chunks` for a newcomer, after every running request with host
        pages got its own back (least laxity first), as requests finish: a resident one after its remaining
        tokens, a promoted one after its remaining tokens from its promotion (inf if that never frees enough)."""
        releases, parked = [], []
        for request in running:
            state = self.kv.requests[request.request_id]
            steps = max(request.params.max_tokens - len(request.output_token_ids), 0)
            prefill_ms = self.cost_model.predict_ms(request.num_tokens - request.num_computed_tokens) \
                if request.is_prefilling else 0.0
            if state.host_pages:
                parked.append((self.laxity_ms(request, step_ms), 2 * len(state.host_pages),
                               prefill_ms + steps * step_ms, self.kv.chunks_to_grow(None, request.num_tokens)))
            else:
                held = self.kv.chunks_to_grow(None, request.num_computed_tokens)
                releases.append((prefill_ms + steps * step_ms, held))
        queue = [(need, decode_ms, total) for _, need, decode_ms, total in sorted(parked)] + [(num_chunks, 0.0, 0)]
        heapq.heapify(releases)
        free, now = 0, 0.0
        while True:
            while queue and queue[0][0] <= free:
                need, decode_ms, total = queue.pop(0)
                free -= need
                if not queue:
                    return now
                heapq.heappush(releases, (now + decode_ms, total))
            if not releases:
                return float("inf")
            now, chunks = heapq.heappop(releases)
            free += chunks

    def make_room(self, request: Request, num_cached: int, end: int, available: int,
                  running: Sequence[Request], parked: Set[str] = frozenset()) -> bool:
        """Donors: in place, any decode (a demoted layer is read where it lands at the same speed: one copy,
        no later cost); staged, with a TTFT target (TTFT first), parked decodes still within their TPOT target
        (a resident decode demoted would fetch every step)."""
        if self.kv.host_tier is not None:
            donors = [r for r in running if not r.is_prefilling]
        elif self.slo.ttft_ms is not None:
            step_ms = self.cost_model.predict_ms(len(running))
            donors = [r for r in running if r.request_id in parked and self.laxity_ms(r, step_ms) >= 0]
        else:
            donors = []
        options = list(self._admissions(request, num_cached, end))
        if len(options) < self.kv.spec.num_layers or options[-1][1] <= available or not donors:
            return False  # the host buffer cannot take all its layers, or it fits already
        if not self.tpot_feasible(request, options[-1][0], running):
            return False
        shortfall = options[-1][1] - available
        return self.demote(shortfall, donors) >= shortfall

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
            if host > kv.host_room():
                return
            staging = 0 if kv.host_tier is not None else staging_chunks(
                [step_pages if layer in offloaded else 0 for layer in range(num_layers)])
            yield offloaded, device + staging

    def decode_step_ms(self, running: Sequence[Request]) -> float:
        """A decode step's time as the running requests see it now: their mean observed TPOT (prefill chunks
        between decodes included), the cost model's prediction before any has one."""
        observed = [tpot for tpot in (self.slo.observed_tpot_ms(r) for r in running) if tpot is not None]
        return sum(observed) / len(observed) if observed else self.cost_model.predict_ms(len(running) + 1)

    def demote(self, num_chunks: int, candidates: Sequence[Request]) -> int:
        """Moves layers of the requests with the most laxity to the host until `num_chunks` device chunks
        are free; returns how many were freed."""
        freed = 0
        step_ms = self.cost_model.predict_ms(len(candidates))
        order = sorted(candidates, key=lambda r: (self.laxity_ms(r, step_ms), self.slo.tpot_slack_ms(r)), reverse=True)
        for request in order:
            request_id = request.request_id
            for layer in reversed(self._demotable_layers(request_id)):
                if freed >= num_chunks:
                    return freed
                gain = self.kv.chunks_freed_by_demoting(request_id, layer)
                if gain == 0 or gain > self.kv.host_buffer.num_free:
                    continue
                freed += self.kv.demote(request_id, layer)
                self.num_demotions += 1
        return freed

    def decodes_to_defer(self, running: Sequence[Request], compute_ms: float) -> set[str]:
        """Decodes with host pages, least laxity first, while the stall their fetches add to a step of
        `compute_ms` stays nil (`fetch_stall_ms`), or, for a request with no laxity left or when no resident
        request decodes, within what `tpot_margin` x the TPOT target leaves after the compute; the rest wait.
        When no resident request decodes, the least-laxity offloaded one always does."""
        if self.slo.tpot_ms is None:
            return set()
        decoding = [r for r in running if not r.is_prefilling]
        offloaded = [r for r in decoding if self.kv.requests[r.request_id].host_pages]
        paced = max(0.0, self.margin * self.slo.tpot_ms - compute_ms)
        must_one = len(offloaded) == len(decoding)
        deferred, staged = set(), [0] * self.kv.spec.num_layers
        laxity = {r.request_id: self.laxity_ms(r, compute_ms) for r in offloaded}
        for index, request in enumerate(sorted(offloaded, key=lambda r: laxity[r.request_id])):
            with_it = [total + own for total, own in zip(staged, self.layer_fetch_bytes(request), strict=True)]
            # with no resident decode in the step, there is no one else's TPOT to protect
            limit = paced if must_one or laxity[request.request_id] <= 0 else 0.0
            if self.fetch_stall_ms(with_it, compute_ms) <= limit or (index == 0 and must_one):
                staged = with_it
            else:
                deferred.add(request.request_id)
        return deferred

    def layer_fetch_bytes(self, request: Request) -> list[int]:
        """Bytes a decode step of `request` stages per layer (its host pages there, both ways)."""
        request_id, end = request.request_id, request.num_computed_tokens + 1
        staged = [0] * self.kv.spec.num_layers
        for layer in self.kv.layers_with_host_pages(request_id):
            staged[layer] = 2 * self.kv.num_pages_to_stage(request_id, layer, end) * self.kv.spec.page_bytes
        return staged

    def fetch_stall_ms(self, staged: Sequence[int], compute_ms: float) -> float:
        """What staging `staged` bytes per layer adds to a step of `compute_ms`: a layer's fetch overlaps one
        layer's compute (the stager copies one layer ahead), so a step stalls by each layer's copy time beyond
        a layer's share of the compute (offloaded layers are the top ones: their fetches do not spread out)."""
        layer_ms = compute_ms / len(staged)
        rate = self.cost_model.copy_bytes_per_ms
        return sum(max(0.0, num_bytes / rate - layer_ms) for num_bytes in staged if num_bytes)

    def promote(self, running: Sequence[Request], spare_chunks: Callable[[], int],
                parked: Set[str] = frozenset()) -> int:
        """Brings offloaded layers back while the spare chunks last: decoding requests least laxity first, each
        made whole or left alone (a parked request decodes at device speed once whole; a fragment more still
        fetches every step), then prompts still prefilling, most urgent first (any layers that fit).
        Consolidation: a decode that the spare chunks cannot make whole takes the device layers of `parked`
        decodes (sitting this step out) with more laxity (they go to the host, one layer kept) when that makes
        it whole: memory held as fragments of many parked requests decodes nobody at device speed, the same
        memory holding whole requests does. Donors come later in the order than the request they give to, so
        nobody made whole in a call gives its layers away in the same call."""
        offloaded = [r for r in running if self.kv.requests[r.request_id].residency.count(HOST)
                     or self.kv.requests[r.request_id].host_pages]
        if not offloaded or spare_chunks() <= 0 and not parked:
            return 0
        step_ms = self.cost_model.predict_ms(len(running))
        laxity = {r.request_id: self.laxity_ms(r, step_ms) for r in offloaded}
        decoding = sorted((r for r in offloaded if not r.is_prefilling), key=lambda r: laxity[r.request_id])
        order = decoding + sorted((r for r in offloaded if r.is_prefilling), key=self.slo.urgency)
        used = 0
        for index, request in enumerate(order):
            request_id = request.request_id
            layers = self.kv.layers_with_host_pages(request_id)
            need = sum(self.kv.chunks_to_promote(request_id, layer) for layer in layers)
            spare = spare_chunks()
            if need > spare and not request.is_prefilling:
                # donors: parked decodes with more laxity (later in the order, none of them made whole yet)
                donors = [r for r in decoding[index + 1:] if r.request_id in parked]
                if spare + self._donatable(donors) < need:
                    continue  # a decode is made whole or left alone: a fragment more still fetches every step
                self.demote(need - spare, donors)
                self.num_consolidations += 1
            for layer in layers:
                chunks = self.kv.chunks_to_promote(request_id, layer)
                if chunks > spare_chunks() or not self.kv.promote(request_id, layer):
                    return used
                used += chunks
                self.num_promotions += 1
        return used

    def _donatable(self, donors: Sequence[Request]) -> int:
        """Device chunks `demote` could free from `donors` (each keeps one device layer), host room allowing."""
        total = 0
        for request in donors:
            request_id = request.request_id
            total += sum(self.kv.chunks_freed_by_demoting(request_id, layer)
                         for layer in self._demotable_layers(request_id))
        return min(total, self.kv.host_buffer.num_free)

    def _demotable_layers(self, request_id: str) -> list[int]:
        """The request's device layers but its lowest: it keeps one (a request all on the host stalls)."""
        residency = self.kv.requests[request_id].residency
        return [layer for layer, where in enumerate(residency) if where == DEVICE][1:]


OFFLOAD_POLICIES = {"none": NoOffload, "layerwise": LayerwiseOffload}

__all__ = ["HOST", "OFFLOAD_POLICIES", "LayerwiseOffload", "NoOffload"]
