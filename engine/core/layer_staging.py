"""Staging offloaded layers' KV for one step (LayerKV): attention reads host-resident pages from a
staging buffer in the `activations` balloon, fetched one layer ahead.

Before layer l runs, every host page of layer l that the step's requests touch is copied into a
staging chunk, and that chunk is *mapped at the request's own page* of layer l's virtual KV tensor;
attention therefore reads (and writes the step's new K/V into) the staging buffer through the very
views it uses for resident pages, with no change to the kernels and no gather, and requests with
and without offloaded layers share one batch. Right after layer l's attention, the pages the step
wrote go back to the host (only the token rows it wrote: one per decode) and the staging chunks are
unmapped and reused for layer l + 2.

Double buffering: fetches and write-backs run in order on one copy engine (a thread on CPU, a CUDA
stream on GPU), so layer l + 1's fetch overlaps layer l's compute and at most two layers hold
staging chunks at once: `staging_chunks` = 2 x the largest pages(l) + pages(l + 1). The chunks are
taken from the pool for the step (charged to `activations`) and given back after it.

Modes (`KVOffload.staging`): `copy` is the path a GPU runs (host pages are not addressable by the
device); `inline` does the same copies on the compute thread (no overlap; the reference for tests).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from memory.kv.residency import HostPage
from memory.pool import ElasticPool

STAGING_CLIENT = "activations"


class StagedCopy(NamedTuple):
    slot: int
    page: int
    host: HostPage
    fetch: bool  # the page holds tokens already: copy it in before the layer runs
    rows: tuple[int, int]  # the page's token rows [first, end) the step writes: copied out after the layer ran

    @property
    def write_back(self) -> bool:
        return self.rows[1] > self.rows[0]


class StepSpan(NamedTuple):
    """One request's part of a step: tokens [start, end) are computed in KV slot `slot`."""

    request_id: str
    slot: int
    start: int
    end: int


def staging_plan(kv, spans: Sequence[StepSpan]) -> list[list[StagedCopy]]:
    """Per layer, the host pages the step reads or writes (empty lists when nothing is offloaded)."""
    plan: list[list[StagedCopy]] = [[] for _ in range(kv.spec.num_layers)]
    page_tokens = kv.spec.tokens_per_page
    for span in spans:
        if not kv.has_host_pages(span.request_id):
            continue
        for layer in range(kv.spec.num_layers):
            for staged in kv.staged_pages(span.request_id, layer, span.end):
                first = staged.page * page_tokens
                rows = (max(span.start - first, 0), max(min(span.end - first, page_tokens), 0))
                plan[layer].append(StagedCopy(span.slot, staged.page, staged.host, staged.has_data,
                                              rows if rows[1] > rows[0] else (0, 0)))
    return plan


def staging_chunks(pages_per_layer: Sequence[int]) -> int:
    """Chunks double-buffered staging holds at most: K and V of two consecutive layers' pages."""
    if not pages_per_layer:
        return 0
    pairs = [a + b for a, b in zip(pages_per_layer, list(pages_per_layer[1:]) + [0], strict=True)]
    return 2 * max(pairs)


@dataclass
class StagingStats:
    """What staging moved, kept by the engine (whichever runner runs the steps writes here)."""

    bytes_fetched: int = 0  # cumulative host -> staging bytes
    bytes_fetched_last_step: int = 0
    copy_ms_last_step: float = 0.0  # copy-engine time fetching in the last step

    def record(self, stager: LayerStager | None) -> None:
        self.bytes_fetched_last_step = stager.bytes_fetched if stager is not None else 0
        self.copy_ms_last_step = stager.copy_seconds * 1e3 if stager is not None else 0.0
        self.bytes_fetched += self.bytes_fetched_last_step


class CopyEngine(Protocol):
    """Runs copy jobs in submission order, off the compute path where it can."""

    def submit(self, job: Callable[[], None]) -> object: ...

    def wait(self, handle: object) -> None: ...

    def drain(self) -> None:
        """Blocks until every submitted job has finished (its copies landed)."""


class InlineCopies:
    """Runs each job at once on the calling thread (no overlap)."""

    def submit(self, job: Callable[[], None]) -> object:
        job()
        return None

    def wait(self, handle: object) -> None:
        return None

    def drain(self) -> None:
        return None


class ThreadCopies:
    """One copy thread: torch copies release the GIL, so they overlap the next layer's compute."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-staging")
        self._last: Future | None = None

    def submit(self, job: Callable[[], None]) -> Future:
        self._last = self._executor.submit(job)
        return self._last

    def wait(self, handle: Future) -> None:
        handle.result()

    def drain(self) -> None:
        if self._last is not None:  # one worker runs jobs in order: the last done means all done
            self._last.exception()


class CudaStreamCopies:
    """Copies enqueued on a side stream; the compute stream waits on an event per job (run on an H200 by
    tests/engine/test_cuda_engine.py; no GPU on the development machine). A job that unmaps pages first waits
    for the compute stream (`fence`), since attention kernels may still be reading them."""

    def __init__(self, device: torch.device) -> None:
        self._stream = torch.cuda.Stream(device=device)
        self._device = device

    def submit(self, job: Callable[[], None]) -> torch.cuda.Event:
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            job()
            event = torch.cuda.Event()
            event.record(self._stream)
        return event

    def wait(self, handle: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self._device).wait_event(handle)

    def drain(self) -> None:
        self._stream.synchronize()


COPY_ENGINES: dict[str, Callable[[torch.device], CopyEngine]] = {
    "inline": lambda device: InlineCopies(),
    "in_place": lambda device: InlineCopies(),  # host pages are mapped where they are: nothing to stage
    "copy": lambda device: CudaStreamCopies(device) if device.type == "cuda" else ThreadCopies(),
}


class LayerStager:
    """The model's per-layer hook for one step: `before(l)` waits for layer l's pages, `after(l)`
    writes layer l's new tokens back and starts the fetch of layer l + 2. `close()` always runs."""

    def __init__(self, layout, host_buffer, pool: ElasticPool, plan: list[list[StagedCopy]],
                 copies: CopyEngine, page_tokens: int, make_room: Callable[[int], int] | None = None) -> None:
        self.layout = layout
        self.host_buffer = host_buffer
        self.row_bytes = host_buffer.page_bytes // page_tokens  # one token's K (or V) of this rank's heads
        self.pool = pool
        self.plan = plan
        self.copies = copies
        self.num_chunks = staging_chunks([len(pages) for pages in plan])
        missing = self.num_chunks - pool.num_free()
        if missing > 0 and make_room is not None:  # the workspace's idle pages count as ours
            make_room(missing)
        self._chunks = pool.inflate(STAGING_CLIENT, self.num_chunks) if self.num_chunks else []
        self._free = list(self._chunks)
        self._pending: dict[int, object] = {}
        self._written: list[object] = []
        self._mapped: dict[int, list[StagedCopy]] = {}
        self.bytes_fetched = 0
        self.bytes_written_back = 0
        self.copy_seconds = 0.0  # time the copy engine spent fetching (for the step-cost model)
        for layer in (0, 1):
            self._start_fetch(layer)

    def before(self, layer: int) -> None:
        handle = self._pending.pop(layer, None)
        if handle is not None:
            self.copies.wait(handle)

    def after(self, layer: int) -> None:
        if self.plan[layer]:
            self._written.append(self.copies.submit(lambda: self._write_back(layer)))
        self._start_fetch(layer + 2)

    def close(self) -> None:
        """Waits for every copy, unmaps what is still mapped, gives the staging chunks back."""
        try:
            self.copies.drain()
            for handle in [*self._pending.values(), *self._written]:  # re-raises a failed copy
                if isinstance(handle, Future):
                    handle.result()
        finally:
            self._pending.clear()
            for layer in list(self._mapped):
                self._unmap(layer)
            if self._chunks:
                self.pool.deflate(STAGING_CLIENT, self._chunks)
                self._chunks = []

    # ---- jobs (on the copy engine) -------------------------------------------------------------
    def _start_fetch(self, layer: int) -> None:
        if layer < len(self.plan) and self.plan[layer]:
            self._pending[layer] = self.copies.submit(lambda: self._fetch(layer))

    def _fetch(self, layer: int) -> None:
        started = time.perf_counter()
        staged = self.plan[layer]
        for copy in staged:
            key_chunk, value_chunk = self._free.pop(), self._free.pop()
            self.layout.map_layer_page(layer, copy.slot, copy.page, key_chunk, value_chunk)
            if copy.fetch:
                key_view, value_view = self.layout.layer_page_views(layer, copy.slot, copy.page)
                self.host_buffer.copy_out(copy.host.key, key_view)
                self.host_buffer.copy_out(copy.host.value, value_view)
                self.bytes_fetched += 2 * self.host_buffer.page_bytes
        self._mapped[layer] = staged
        self.copy_seconds += time.perf_counter() - started

    def _write_back(self, layer: int) -> None:
        """Copies the rows the step wrote (a decode: one token's) of each staged page back to the host."""
        for copy in self.plan[layer]:
            if copy.write_back:
                start, end = copy.rows[0] * self.row_bytes, copy.rows[1] * self.row_bytes
                key_view, value_view = self.layout.layer_page_views(layer, copy.slot, copy.page)
                self.host_buffer.copy_in_bytes(copy.host.key, key_view, start, end)
                self.host_buffer.copy_in_bytes(copy.host.value, value_view, start, end)
                self.bytes_written_back += 2 * (end - start)
        if self.host_buffer.is_pinned:  # the device copies must land before the pages are unmapped
            torch.cuda.current_stream().synchronize()
        self._unmap(layer)

    def _unmap(self, layer: int) -> None:
        for copy in self._mapped.pop(layer, []):
            self._free.extend(self.layout.unmap_layer_page(layer, copy.slot, copy.page))


def step_staging_plan(kv, output) -> list[list[StagedCopy]] | None:
    """What one step (`output`: a SchedulerOutput) stages over `kv` (a KVCacheManager); None when it touches
    no host page. Under tensor parallelism rank 0 sends it to the other ranks with the step (memory/kv/mirror.py)."""
    if not kv.num_offloaded_host_chunks:
        return None
    spans = [StepSpan(chunk.request_id, chunk.slot, chunk.start, chunk.start + len(chunk.token_ids))
             for chunk in output.decodes + output.prefills]
    plan = staging_plan(kv, spans)
    return plan if any(plan) else None


def step_stager(kv, output, copies: CopyEngine, make_room: Callable[[int], int] | None) -> LayerStager | None:
    """The stager of one step's plan over `kv`; None when the step touches no host page. The ModelRunner and
    the simulator's executor both build it here."""
    plan = step_staging_plan(kv, output)
    if plan is None:
        return None
    return LayerStager(kv.layout, kv.host_buffer, kv.pool, plan, copies, kv.spec.tokens_per_page, make_room)
