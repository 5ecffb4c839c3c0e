"""The layer-wise offloading policy and SLO classes in the real scheduler and KV manager (host backend,
4 layers, 16-token pages of 4 KiB; activations cost nothing here so the chunk counts are exact):
admission with the fewest top layers on the host, demotion of the request with the most slack before
any preemption, promotion when memory frees, priority order, SLO attainment."""

from __future__ import annotations

import time

import pytest
import torch

from engine.core.request import Request, RequestStatus
from engine.core.sampler import SamplingState
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.slo import SloTargets
from engine.core.step_cost import StepCostModel
from engine.host_split import fewest_host_layers
from engine.sampling_params import SamplingParams
from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup
from memory.kv.host_tier import HostChunkTier


@pytest.fixture
def build():
    host = create_backend("host")
    made = []

    def make(num_chunks: int, kv_offload: str = "layerwise", in_place: bool = False,
             tpot_slo_ms: float | None = None) -> Scheduler:
        spec = KVCacheSpec(num_layers=4, num_kv_heads=1, head_dim=64, dtype_bytes=4,
                           groups=(LayerGroup((0, 1, 2, 3), None),), max_slots=4, max_len=256, tokens_per_page=16)
        host_buffer = HostBuffer(64 * spec.page_bytes, spec.page_bytes)
        pool = ElasticPool(host, num_chunks * spec.page_bytes, spec.page_bytes, host_buffer=host_buffer)
        tier = HostChunkTier(host, spec.page_bytes, 64) if in_place else None
        kv = KVCacheManager(spec, pool, torch.float32, host_buffer=host_buffer, enable_prefix_caching=False,
                            host_tier=tier)
        made.append(kv)
        config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=256, kv_offload=kv_offload,
                                 tpot_slo_ms=tpot_slo_ms)
        cost = StepCostModel(base_ms=10.0, per_token_ms=1.0)
        return Scheduler(config, kv, activation_chunks=lambda tokens, sampled: 0, cost_model=cost)

    yield make
    for kv in made:
        kv.close()
    host.close()


def _request(name: str, num_prompt: int, priority: int = 0, arrival: float | None = None) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=8)
    return Request(name, list(range(num_prompt)), params, SamplingState(params), None,
                   time.monotonic() if arrival is None else arrival, priority=priority)


def _run_step(scheduler: Scheduler) -> None:
    """Schedules a step and marks it computed, appending a token to every request that samples."""
    plan = scheduler.schedule()
    scheduler.mark_computed(plan)
    for chunk in plan.decodes + plan.prefills:
        if chunk.samples:
            scheduler.requests[chunk.request_id].output_token_ids.append(7)


def test_a_prompt_that_does_not_fit_waits_without_offloading(build):
    scheduler = build(30, kv_offload="none")
    scheduler.add(_request("a", 64))  # 65 tokens: 5 pages x 4 layers x (K, V) = 40 chunks > 30
    assert scheduler.schedule().is_empty and [r.request_id for r in scheduler.waiting] == ["a"]


def test_layerwise_admits_with_the_fewest_top_layers_on_the_host(build):
    scheduler = build(30)
    scheduler.add(_request("a", 64))
    plan = scheduler.schedule()
    # 1 layer on the host: 30 device chunks + staging 2 x 4 pages = 38 > 30; 2 layers: 20 + 16 = 36;
    # 3 layers: 10 + 16 = 26 <= 30
    assert [(c.request_id, c.start, len(c.token_ids)) for c in plan.prefills] == [("a", 0, 64)]
    assert scheduler.kv.offloaded_layers("a") == (1, 2, 3)
    assert scheduler.kv.layer_chunk_counts("a") == [(8, 0), (0, 8), (0, 8), (0, 8)]
    assert scheduler.offload.num_partial_admissions == 1


def test_fetching_offloaded_layers_takes_its_share_of_the_tpot_target(build):
    scheduler = build(30, tpot_slo_ms=50.0)
    scheduler.add(_request("a", 64))
    _run_step(scheduler)  # layers 1-3 on the host; the next decode stages 5 pages of each
    assert scheduler.offload.fetch_bytes(scheduler.running) == 3 * 5 * 2 * scheduler.kv.spec.page_bytes
    scheduler.cost_model.observe_copy(0, 1.0)  # nothing copied: the bandwidth stays
    fetch = scheduler.offload.fetch_bytes(scheduler.running)
    # the fetch runs one layer ahead of compute: the step takes the longer of the two, within 0.8 x 50 ms
    scheduler.cost_model.copy_bytes_per_ms = fetch / 20.0
    assert scheduler._token_budget() == 30  # 20 ms of fetch hide behind (40 ms - 10 ms base) / 1 ms per token
    scheduler.cost_model.copy_bytes_per_ms = fetch / 45.0
    assert scheduler._token_budget() == 2  # 45 ms of fetch alone exceed 40 ms: the decode and one token more
    assert scheduler.kv.promote("a", 1) and scheduler.kv.promote("a", 2)
    assert not scheduler.kv.promote("a", 3)  # 6 chunks left, layer 3 needs 8: it stays on the host
    assert scheduler._token_budget() == 30  # one layer left to fetch: 15 ms


def test_in_place_needs_no_staging_so_fewer_layers_go_to_the_host(build):
    scheduler = build(30, in_place=True)
    scheduler.add(_request("a", 64))
    scheduler.schedule()
    assert scheduler.kv.offloaded_layers("a") == (3,)  # 30 device chunks, no staging buffer
    assert scheduler.kv.layer_chunk_counts("a") == [(8, 0), (8, 0), (8, 0), (0, 8)]
    assert scheduler.kv.host_tier.num_used == 8


def test_demotes_the_request_with_most_slack_before_preempting_then_promotes(build):
    scheduler = build(40, in_place=True)
    scheduler.add(_request("a", 31, priority=0))
    scheduler.add(_request("b", 31, priority=1))  # lower priority: more TPOT slack
    _run_step(scheduler)  # both prefill: 2 pages each, 32 of 40 chunks
    assert scheduler.kv.layer_chunk_counts("b") == [(4, 0)] * 4
    _run_step(scheduler)  # decodes position 31: still two pages
    assert scheduler.kv.offloaded_layers("b") == ()
    _run_step(scheduler)  # position 32 opens a third page: a takes the last 8 chunks, b would need 8 more
    assert scheduler.num_preemptions == 0
    assert scheduler.kv.offloaded_layers("a") == ()
    assert scheduler.kv.offloaded_layers("b") == (2, 3)  # top layer first, until b's page fits
    assert scheduler.kv.layer_chunk_counts("b") == [(6, 0), (6, 0), (0, 6), (0, 6)]
    assert scheduler.offload.num_demotions == 2
    scheduler.finish(scheduler.requests["a"], "stop")  # memory frees: b's layers come back
    _run_step(scheduler)
    assert scheduler.kv.offloaded_layers("b") == () and scheduler.kv.host_tier.num_used == 0
    assert scheduler.offload.num_promotions == 2


def test_waiting_queue_is_in_priority_order(build):
    scheduler = build(200, kv_offload="none")
    for name, priority in (("p0", 0), ("p1", 1), ("urgent", -1), ("p0b", 0)):
        scheduler.add(_request(name, 8, priority=priority))
    assert [r.request_id for r in scheduler.waiting] == ["urgent", "p0", "p0b", "p1"]


def test_slo_attainment_uses_the_class_targets(build):
    targets = SloTargets(ttft_ms=100.0, tpot_ms=10.0, priority_scale=2.0)
    now = time.monotonic()
    fast = _request("fast", 8, arrival=now - 1.0)
    fast.first_token_time = now - 1.0 + 0.05  # TTFT 50 ms
    slow = _request("slow", 8, arrival=now - 1.0)
    slow.first_token_time = now - 1.0 + 0.15  # 150 ms: misses 100 ms ...
    batch = _request("batch", 8, priority=1, arrival=now - 1.0)
    batch.first_token_time = now - 1.0 + 0.15  # ... but priority 1 has 200 ms
    assert targets.attained(fast, now) and not targets.attained(slow, now) and targets.attained(batch, now)
    fast.output_token_ids = [1] * 11  # 950 ms over 10 tokens: 95 ms > 10 ms TPOT
    assert not targets.attained(fast, now)
    scheduler = build(200, kv_offload="none")
    for request in (slow, batch):
        scheduler.requests[request.request_id] = request
        request.status = RequestStatus.RUNNING
        scheduler.running.append(request)
        scheduler.kv.admit(request.request_id, request.prompt_token_ids)
    scheduler.config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=512, max_model_len=256)
    scheduler.slo = targets
    scheduler.finish(slow, "stop")
    scheduler.finish(batch, "abort")  # aborts are not counted
    assert (scheduler.attainment.num_attained, scheduler.attainment.num_finished) == (0, 1)


def test_decodes_with_host_layers_are_paced_by_the_tpot_target(build):
    scheduler = build(100, tpot_slo_ms=50.0)
    scheduler.add(_request("a", 64, arrival=1.0))
    scheduler.add(_request("b", 64, arrival=2.0))  # later: more slack while neither has a TPOT yet
    _run_step(scheduler)  # both prefill whole (40 chunks each) and sample their first token
    for name in ("a", "b"):
        assert scheduler.kv.demote(name, 3) and scheduler.kv.demote(name, 2)
    running, policy = scheduler.running, scheduler.offload
    one = policy.fetch_bytes([scheduler.requests["a"]])
    assert one == 2 * 5 * 2 * scheduler.kv.spec.page_bytes  # 2 layers x 5 pages x (K, V)
    scheduler.cost_model.copy_bytes_per_ms = one / 10.0  # one request's fetch takes 10 ms
    # a layer's copy overlaps one layer's compute: both fetch 10 ms into each of layers 2 and 3, a 20 ms step
    # computes 5 ms a layer, so they stall it 2 x 5 ms, within the 0.8 x 50 - 20 = 20 ms no resident decode's
    # TPOT leaves
    assert policy.fetch_stall_ms([0, 0, 2 * one // 2, 2 * one // 2], 20.0) == pytest.approx(10.0)
    assert policy.decodes_to_defer(running, 20.0) == set()
    # no resident decode: no one else's TPOT to protect, up to 0.8 x 50 - 5 = 35 ms of stall (here 17.5 ms)
    assert policy.decodes_to_defer(running, 5.0) == set()
    assert scheduler.kv.promote("a", 2) and scheduler.kv.promote("a", 3)
    assert policy.decodes_to_defer(running, 5.0) == {"b"}  # a decodes resident: b's 2 x 3.75 ms would slow it
    # 12 ms of compute would hide b's 10 ms if copies spread over the step, but its two layers' copies overlap
    # only two layers' compute (3 ms each): 4 ms of stall
    assert policy.decodes_to_defer(running, 12.0) == {"b"}
    assert policy.decodes_to_defer(running, 20.0) == set()  # 5 ms a layer: each 5 ms copy hides
    b = scheduler.requests["b"]
    b.first_token_time = scheduler.clock() - 1.0  # 1 s for one token, 7 to go within 0.8 x 50 ms x 7: no laxity
    assert policy.laxity_ms(b, 5.0) < 0
    assert policy.decodes_to_defer(running, 5.0) == set()  # urgent: it may use the margin's 35 ms


@pytest.mark.parametrize("in_place", [False, True])
def test_import_splits_are_what_the_destination_reserves_and_its_rule_picks_from(build, in_place):
    """The splits a layerwise replica reports for the controller (`import_splits`) count exactly what
    `chunks_to_grow` / `host_chunks_to_grow` say such an import takes, and `layers_to_import` picks the first
    that `fewest_host_layers` accepts: the controller's placement (deployments/telemetry.py) uses the same."""
    scheduler = build(30, in_place=in_place)
    offload, kv = scheduler.offload, scheduler.kv
    splits = list(offload.import_splits(64, 65))  # 64 tokens, 5 pages reserved: the next decode stages 4 pages
    for split in splits:
        offloaded = tuple(range(4 - split.num_host_layers, 4))
        assert split.device_chunks == kv.chunks_to_grow(None, 65, offloaded)
        assert split.host_pages == kv.host_chunks_to_grow(None, 65, offloaded)
    assert [(s.num_host_layers, s.device_chunks, s.host_pages, s.staging_chunks) for s in splits] == [
        (1, 30, 10, 8), (2, 20, 20, 16), (3, 10, 30, 16), (4, 0, 40, 16)]
    room = offload.host_room()
    assert (room.pages, room.staged) == (64, not in_place)
    # copies: 30 + 8 and 20 + 16 > 30, 10 + 16 fits; in place nothing is staged: 1 layer (30 chunks) fits
    assert offload.layers_to_import(64, 65, 30) == ((1, 2, 3) if not in_place else (3,))
    assert fewest_host_layers(splits, 30, room).num_host_layers == (3 if not in_place else 1)
    assert offload.layers_to_import(64, 65, 40) == ()  # whole: 40 chunks
    # 5 chunks: copies cannot stage even all 4 layers (16 chunks); in place all 4 go to the host (40 of 64 pages)
    expected = None if not in_place else (0, 1, 2, 3)
    assert offload.layers_to_import(64, 65, 5) == expected
    assert fewest_host_layers(splits, 5, room) == (None if not in_place else splits[3])


def test_in_place_a_prompt_starts_by_demoting_a_decodes_layers(build):
    """In place a demoted layer is read where it lands, so when even all of a prompt's layers on the host do
    not fit (the running decode's next page takes the last chunks), a decode's top layer goes to the host
    tier and the prompt starts at once instead of waiting for the decode to finish."""
    scheduler = build(40, in_place=True)
    scheduler.add(_request("a", 79))  # 80 tokens with its first output: 5 pages x 4 layers x (K, V) = 40 chunks
    _run_step(scheduler)
    assert scheduler.kv.offloaded_layers("a") == () and scheduler.kv.num_available_chunks() == 0
    scheduler.add(_request("b", 64))
    plan = scheduler.schedule()  # a's 81st token needs a 6th page on every device layer: 8 chunks short
    assert [c.request_id for c in plan.decodes] == ["a"] and [c.request_id for c in plan.prefills] == ["b"]
    assert scheduler.kv.offloaded_layers("a") == (3,)  # one layer (10 chunks) covers the 8 short
    assert scheduler.kv.offloaded_layers("b") == (0, 1, 2, 3)
    assert scheduler.offload.num_demotions == 1


def test_promotion_makes_a_decode_whole_from_parked_fragments_or_leaves_it(build):
    """Spare memory too small to make the least-laxity decode whole: parked decodes with more laxity give it
    their device layers (each keeps one) and it decodes at device speed; one that still cannot be made whole
    gets nothing (a fragment more would still fetch every step)."""
    scheduler = build(100, tpot_slo_ms=50.0)
    for name in ("p1", "p2", "p3"):
        scheduler.add(_request(name, 31))  # 32 tokens with the first output: 2 pages x 4 layers x (K, V)
    _run_step(scheduler)
    kv, policy, now = scheduler.kv, scheduler.offload, scheduler.clock()
    for name, layers, age in (("p1", (3, 2, 1), 0.3), ("p2", (3, 2), 0.2), ("p3", (3,), 0.1)):
        for layer in layers:
            assert kv.demote(name, layer)
        scheduler.requests[name].first_token_time = now - age  # p1 waited longest: least laxity
    running = scheduler.running
    laxity = [policy.laxity_ms(scheduler.requests[name], 10.0) for name in ("p1", "p2", "p3")]
    assert laxity == sorted(laxity)
    reserve = kv.num_available_chunks() - 4  # 4 chunks spare; p1 needs 3 layers x 4 = 12
    used = policy.promote(running, lambda: kv.num_available_chunks() - reserve, parked={"p2", "p3"})
    assert used == 12 and policy.num_consolidations == 1
    assert kv.offloaded_layers("p1") == ()  # whole
    assert kv.offloaded_layers("p3") == (1, 2, 3)  # gave layers 1 and 2 (8 chunks), kept layer 0
    assert kv.offloaded_layers("p2") == (2, 3)  # nothing left to make it whole from: left alone
    assert kv.num_available_chunks() - reserve == 0
