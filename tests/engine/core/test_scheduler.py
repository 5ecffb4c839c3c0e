"""The scheduler's plans, step by step, in the style of vLLM v1's scheduler tests: each scenario calls
`Scheduler.schedule()` and asserts the exact `SchedulerOutput` (request ids, KV slots, chunk starts and
lengths, which chunks sample, preemptions), then plays the step the way LLMEngine.update does (mark the
tokens computed, append one sampled token, finish at max_tokens).

The scheduler runs on a real KVCacheManager and ElasticPool over the `host` VMM backend with tiny pages
(4 tokens of 2 KV heads x 128 x fp32 = one 4 KiB OS page per K or V), and a real HostBuffer for swaps.
One layer, so a page of KV is 2 pool chunks (K and V).
"""

from __future__ import annotations

import time

import pytest
import torch

from engine.core.request import Request, RequestStatus
from engine.core.sampler import SamplingState
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.step_cost import StepCostModel
from engine.sampling_params import SamplingParams
from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup

TOKENS_PER_PAGE = 4
TOKEN = 500  # every sampled token (the scheduler never looks at token values, only at counts)


@pytest.fixture
def make_scheduler():
    """make_scheduler(num_chunks, budget, ...) -> Scheduler; everything is closed after the test."""
    opened = []

    def make(num_chunks: int = 64, max_num_batched_tokens: int = 16, max_num_seqs: int = 4,
             preemption_mode: str = "auto", host_chunks: int = 0, prefix_caching: bool = False,
             activation_chunks=lambda num_tokens, num_sampled: 0, **slo) -> Scheduler:
        spec = KVCacheSpec(num_layers=1, num_kv_heads=2, head_dim=128, dtype_bytes=4,
                           groups=(LayerGroup((0,), None),), max_slots=4, max_len=64, tokens_per_page=TOKENS_PER_PAGE)
        pool = ElasticPool(create_backend("host"), num_chunks * spec.page_bytes, spec.page_bytes)
        host = HostBuffer(host_chunks * spec.page_bytes, spec.page_bytes) if host_chunks else None
        kv = KVCacheManager(spec, pool, torch.float32, host_buffer=host, enable_prefix_caching=prefix_caching)
        opened.append((kv, pool))
        config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                 max_model_len=64, preemption_mode=preemption_mode, tpot_margin=1.0, **slo)
        return Scheduler(config, kv, activation_chunks, StepCostModel(base_ms=10.0, per_token_ms=1.0))

    yield make
    for kv, pool in opened:
        kv.close()
        pool.close()


def add(scheduler: Scheduler, request_id: str, num_prompt_tokens: int, max_tokens: int = 8,
        arrival_time: float | None = None, first_token: int = 0) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    request = Request(request_id, prompt, params, SamplingState(params), None,
                      time.monotonic() if arrival_time is None else arrival_time)
    scheduler.add(request)
    return request


def plan_of(output: SchedulerOutput) -> dict:
    """decodes: (id, slot, position); prefills: (id, slot, start, num_tokens, samples); preempted: ids."""
    return {"decodes": [(c.request_id, c.slot, c.start) for c in output.decodes],
            "prefills": [(c.request_id, c.slot, c.start, len(c.token_ids), c.samples) for c in output.prefills],
            "preempted": list(output.preempted)}


def run_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """What LLMEngine.update does with a plan, without a model."""
    scheduler.mark_computed(output)
    for chunk in output.decodes + tuple(chunk for chunk in output.prefills if chunk.samples):
        request = scheduler.requests[chunk.request_id]
        request.output_token_ids.append(TOKEN)
        if len(request.output_token_ids) >= request.params.max_tokens:
            scheduler.finish(request, "length")


def step(scheduler: Scheduler) -> dict:
    output = scheduler.schedule()
    run_step(scheduler, output)
    return plan_of(output)


def test_admission_chunked_prefill_then_decodes(make_scheduler):
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, "a", 10)
    add(scheduler, "b", 3)
    # a takes the whole budget (8 of its 10 prompt tokens, no sample); b waits for the next step
    assert step(scheduler) == {"decodes": [], "prefills": [("a", 0, 0, 8, False)], "preempted": []}
    # a's last 2 prompt tokens (it samples), then b is admitted into the 6 tokens left, whole
    assert step(scheduler) == {"decodes": [], "prefills": [("a", 0, 8, 2, True), ("b", 1, 0, 3, True)],
                               "preempted": []}
    # both decode: one token each at the position after their prompt, in slot order
    assert step(scheduler) == {"decodes": [("a", 0, 10), ("b", 1, 3)], "prefills": [], "preempted": []}
    assert step(scheduler) == {"decodes": [("a", 0, 11), ("b", 1, 4)], "prefills": [], "preempted": []}


def test_decodes_come_first_and_a_long_prompt_gets_what_is_left(make_scheduler):
    scheduler = make_scheduler(max_num_batched_tokens=8)
    add(scheduler, "a", 3)
    add(scheduler, "b", 3)
    assert step(scheduler)["prefills"] == [("a", 0, 0, 3, True), ("b", 1, 0, 3, True)]
    add(scheduler, "c", 20)
    # two decodes take 2 tokens of the budget of 8: c's first chunk is 6 tokens
    assert step(scheduler) == {"decodes": [("a", 0, 3), ("b", 1, 3)], "prefills": [("c", 2, 0, 6, False)],
                               "preempted": []}
    # c is running now: its next chunk is planned with the decodes, still within the budget
    assert step(scheduler) == {"decodes": [("a", 0, 4), ("b", 1, 4)], "prefills": [("c", 2, 6, 6, False)],
                               "preempted": []}


def test_admission_waits_for_slots_and_for_max_num_seqs(make_scheduler):
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        add(scheduler, name, 2, max_tokens=2)
    assert step(scheduler)["prefills"] == [("a", 0, 0, 2, True), ("b", 1, 0, 2, True)]
    assert [request.request_id for request in scheduler.waiting] == ["c"]
    # a and b finish with this step (max_tokens 2); c is still held back by max_num_seqs while they run
    assert step(scheduler) == {"decodes": [("a", 0, 2), ("b", 1, 2)], "prefills": [], "preempted": []}
    assert step(scheduler) == {"decodes": [], "prefills": [("c", 0, 0, 2, True)], "preempted": []}


def test_admission_leaves_room_for_the_steps_activation_workspace(make_scheduler):
    # 8 chunks; the step's workspace takes 4 chunks whenever it computes any token
    scheduler = make_scheduler(num_chunks=8, activation_chunks=lambda tokens, sampled: 4 if tokens else 0)
    add(scheduler, "a", 7)
    add(scheduler, "b", 7)
    output = scheduler.schedule()
    # a needs 2 pages (4 chunks) + the workspace (4): all 8. b would need 4 more: it waits.
    assert plan_of(output) == {"decodes": [], "prefills": [("a", 0, 0, 7, True)], "preempted": []}
    assert output.num_activation_chunks == 4
    assert [request.request_id for request in scheduler.waiting] == ["b"]


def test_admission_starts_after_the_cached_prefix(make_scheduler):
    scheduler = make_scheduler(prefix_caching=True)
    add(scheduler, "a", 9, max_tokens=1)
    assert step(scheduler) == {"decodes": [], "prefills": [("a", 0, 0, 9, True)], "preempted": []}
    assert "a" not in scheduler.requests  # finished; its two full pages stay in the prefix cache
    add(scheduler, "b", 10, max_tokens=1)  # a's 9 tokens and one more: the first 8 (two pages) are cached
    output = scheduler.schedule()
    assert plan_of(output) == {"decodes": [], "prefills": [("b", 0, 8, 2, True)], "preempted": []}
    assert scheduler.requests["b"].num_cached_tokens == 8


def _fill_the_pool(scheduler: Scheduler) -> None:
    """8 chunks = 4 pages of 4 tokens. a and b (7-token prompts) take 2 pages each; after two steps each
    has 9 tokens (8 computed) and a's next decode needs a third page that is not there."""
    add(scheduler, "a", 7, max_tokens=3)
    add(scheduler, "b", 7, max_tokens=5)
    assert step(scheduler) == {"decodes": [], "prefills": [("a", 0, 0, 7, True), ("b", 1, 0, 7, True)],
                               "preempted": []}
    assert step(scheduler) == {"decodes": [("a", 0, 7), ("b", 1, 7)], "prefills": [], "preempted": []}
    assert scheduler.kv.num_available_chunks() == 0


def test_preemption_by_recompute(make_scheduler):
    scheduler = make_scheduler(num_chunks=8, preemption_mode="recompute")
    _fill_the_pool(scheduler)
    # a needs a page: the newest running request, b, loses its KV and goes back to the front of the queue
    assert step(scheduler) == {"decodes": [("a", 0, 8)], "prefills": [], "preempted": ["b"]}
    b = scheduler.requests["b"]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.WAITING, 0, 1)
    assert "a" not in scheduler.requests  # a finished in that step (max_tokens 3): its pages are free
    # b is recomputed from position 0: its 7 prompt tokens and the 2 tokens it had generated, in one chunk
    assert step(scheduler) == {"decodes": [], "prefills": [("b", 0, 0, 9, True)], "preempted": []}
    assert (scheduler.num_preemptions, scheduler.num_recomputes, scheduler.num_swaps) == (1, 1, 0)


def test_preemption_by_swap(make_scheduler):
    scheduler = make_scheduler(num_chunks=8, preemption_mode="swap", host_chunks=8)
    _fill_the_pool(scheduler)
    assert step(scheduler) == {"decodes": [("a", 0, 8)], "prefills": [], "preempted": ["b"]}
    b = scheduler.requests["b"]
    assert (b.status, b.num_computed_tokens) == (RequestStatus.SWAPPED, 8)
    assert scheduler.kv.host_buffer.num_free == 4  # b's 2 pages x (K, V)
    # a finished; b comes back from the host with its 8 computed tokens and decodes at position 8
    assert step(scheduler) == {"decodes": [("b", 0, 8)], "prefills": [], "preempted": []}
    assert scheduler.kv.host_buffer.num_free == 8
    assert (scheduler.num_preemptions, scheduler.num_recomputes, scheduler.num_swaps) == (1, 0, 1)


def test_auto_preemption_recomputes_when_there_is_no_host_buffer(make_scheduler):
    scheduler = make_scheduler(num_chunks=8, preemption_mode="auto")
    _fill_the_pool(scheduler)
    assert step(scheduler)["preempted"] == ["b"]
    assert scheduler.requests["b"].status is RequestStatus.WAITING


def test_tpot_target_caps_the_prefill_and_a_late_request_lifts_the_cap(make_scheduler):
    # cost model: 10 ms + 1 ms per token, so a 20 ms TPOT target allows 10 tokens per step
    scheduler = make_scheduler(max_num_batched_tokens=32, tpot_slo_ms=20.0, ttft_slo_ms=500.0)
    add(scheduler, "a", 2, max_tokens=16)
    assert step(scheduler)["prefills"] == [("a", 0, 0, 2, True)]
    add(scheduler, "fresh", 30)
    # one decode + 9 prefill tokens = 10
    assert step(scheduler) == {"decodes": [("a", 0, 2)], "prefills": [("fresh", 1, 0, 9, False)], "preempted": []}

    late = make_scheduler(max_num_batched_tokens=32, tpot_slo_ms=20.0, ttft_slo_ms=500.0)
    add(late, "a", 2, max_tokens=16)
    assert step(late)["prefills"] == [("a", 0, 0, 2, True)]
    add(late, "late", 30, arrival_time=time.monotonic() - 0.48)  # 480 ms + a 40 ms prefill: TTFT before TPOT
    assert step(late) == {"decodes": [("a", 0, 2)], "prefills": [("late", 1, 0, 30, True)], "preempted": []}
    lost = make_scheduler(max_num_batched_tokens=32, tpot_slo_ms=20.0, ttft_slo_ms=500.0)
    add(lost, "a", 2, max_tokens=16)
    step(lost)
    add(lost, "lost", 30, arrival_time=time.monotonic() - 1.0)  # its TTFT is lost: the decode's TPOT is kept
    assert step(lost) == {"decodes": [("a", 0, 2)], "prefills": [("lost", 1, 0, 9, False)], "preempted": []}


def test_plan_observers_see_every_plan_before_the_step_runs(make_scheduler):
    scheduler = make_scheduler()
    seen = []
    scheduler.plan_observers.append(lambda output: seen.append((plan_of(output), output.num_tokens)))
    add(scheduler, "a", 3, max_tokens=2)
    step(scheduler)
    step(scheduler)
    step(scheduler)  # nothing left: an empty plan is observed too
    assert seen == [({"decodes": [], "prefills": [("a", 0, 0, 3, True)], "preempted": []}, 3),
                    ({"decodes": [("a", 0, 3)], "prefills": [], "preempted": []}, 1),
                    ({"decodes": [], "prefills": [], "preempted": []}, 0)]
