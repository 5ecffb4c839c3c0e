"""The memory arbiter (eLLM: who gives way when KV and activations both want the pool): its exact decisions
with fakes, then the real scheduler and KV manager (sim backend) acting on them."""

from __future__ import annotations

import pytest
import torch

from engine.core.chunk_policy import AdaptiveChunkPolicy, FixedChunkPolicy, StepMemory
from engine.core.memory_arbiter import ArbiterView, Decision, MemoryArbiter, SwapCandidate, UrgentPrompt
from engine.core.request import Request, RequestStatus
from engine.core.sampler import SamplingState
from engine.core.sampling_workspace import SampledRows
from engine.core.scheduler import Scheduler, SchedulerConfig
from engine.core.step_cost import StepCostModel
from engine.sampling_params import SamplingParams
from memory import ElasticPool, HostBuffer, create_backend
from memory.kv import KVCacheManager, KVCacheSpec, LayerGroup

FLOOR, CEILING = 16, 128
ONE = SampledRows.plain(1)


# ---- the arbiter alone: one chunk per 8 activation tokens, one KV chunk per 4 tokens, step = 10 + 1/token ms --
def arbiter(mode: str = "slo", policy=None) -> MemoryArbiter:
    policy = policy or AdaptiveChunkPolicy(FLOOR, CEILING, lambda tokens, rows: tokens // 8, lambda t: -(-t // 4))
    return MemoryArbiter(policy, lambda tokens: 10.0 + tokens, mode)


def view(available: int, prompt: UrgentPrompt | None, victims=(), cap: int | None = None, num_decodes: int = 4,
         policy_budget: int = FLOOR) -> ArbiterView:
    memory = StepMemory(available, 0, num_decodes + 1, SampledRows.plain(num_decodes + 2))
    return ArbiterView(memory, policy_budget, cap, prompt, tuple(victims), num_decodes)


def victim(name: str, freed: int = 8, slack_ms: float = float("inf")) -> SwapCandidate:
    return SwapCandidate(name, freed, 0, ONE, slack_ms, 1.0)


# a prompt with 84 tokens left that waited 50 ms. With 4 decodes: floor 16 -> 12 per step, 7 steps of 26 ms:
# 232 ms. Budget 32 with 3 decodes: 3 steps of 42 ms (+1 ms swap): 177 ms. Budget 64 with 1 decode: 2 steps
# of 74 ms: 198 ms (+3 ms).
LATE = UrgentPrompt("p", waited_ms=50.0, tokens_left=84, ttft_target_ms=200.0)
# fits(32) = 4 + kv(28)=7 -> 11 chunks; fits(64) = 8 + kv(60)=15 -> 23; fits(128) = 16 + 31 -> 47


def test_kv_first_is_the_policy_budget_under_the_cap_and_never_swaps():
    kv_first = arbiter("kv_first")
    assert kv_first.decide(view(3, LATE, [victim("d3"), victim("d2")])) == Decision(FLOOR, "shrink")
    assert kv_first.decide(view(30, LATE, policy_budget=64)) == Decision(64, "grow")
    assert kv_first.decide(view(30, LATE, policy_budget=64, cap=40)) == Decision(40, "grow")
    assert kv_first.decide(view(30, None, policy_budget=64, cap=5)) == Decision(5, "shrink")
    assert kv_first.actions == {"shrink": 2, "grow": 2} and kv_first.num_victims == 0


def test_slo_swaps_the_fewest_youngest_decodes_for_the_smallest_budget_that_meets_ttft():
    slo = arbiter()
    # 3 chunks free: 32 needs 11, one victim gives 8 -> 11
    assert slo.decide(view(3, LATE, [victim("d3"), victim("d2"), victim("d1")])) == Decision(32, "swap", ("d3",))
    # victims that free less: two are needed
    assert slo.decide(view(3, LATE, [victim("d3", 6), victim("d2", 6), victim("d1")])) == \
        Decision(32, "swap", ("d3", "d2"))
    assert slo.actions == {"swap": 2} and slo.num_victims == 3


def test_slo_leaves_everyone_alone_when_the_prompt_meets_its_target_as_things_are():
    on_time = UrgentPrompt("p", waited_ms=0.0, tokens_left=84, ttft_target_ms=250.0)  # 232 ms at the floor
    assert arbiter().decide(view(3, on_time, [victim("d3")])) == Decision(FLOOR, "shrink")
    assert arbiter().decide(view(3, None, [victim("d3")])) == Decision(FLOOR, "shrink")


def test_slo_does_not_swap_when_no_larger_budget_meets_the_target():
    # 32 with one victim: 190 + 127 ms; 64 with all three: 190 + 3 + 2 x 74 ms; 128 never fits
    hopeless = UrgentPrompt("p", waited_ms=190.0, tokens_left=84, ttft_target_ms=200.0)
    assert arbiter().decide(view(3, hopeless, [victim("d3"), victim("d2"), victim("d1")])) == Decision(FLOOR, "shrink")


def test_slo_does_not_swap_a_decode_without_the_tpot_slack_to_wait():
    # the prompt's prefill at 32 takes 127 ms (3 steps + the swap): a victim with 100 ms of slack may not wait
    decision = arbiter().decide(view(3, LATE, [victim("d3", slack_ms=100.0)]))
    assert decision == Decision(FLOOR, "shrink")
    assert arbiter().decide(view(3, LATE, [victim("d3", slack_ms=130.0)])) == Decision(32, "swap", ("d3",))


def test_slo_respects_the_tpot_cap_and_a_fixed_policy():
    assert arbiter().decide(view(3, LATE, [victim("d3")], cap=20)) == Decision(FLOOR, "shrink")
    fixed = arbiter(policy=FixedChunkPolicy(FLOOR))
    assert fixed.decide(view(3, LATE, [victim("d3")])) == Decision(FLOOR, "shrink")


def test_slo_takes_a_larger_budget_when_only_it_meets_the_target():
    # 72 ms waited: the floor gives 254 ms, 32 gives 72 + 1 + 126 = 199 (meets)
    assert arbiter().decide(view(3, UrgentPrompt("p", 72.0, 84, 200.0), [victim("d3")])) == \
        Decision(32, "swap", ("d3",))
    late = UrgentPrompt("p", 30.0, 200, 400.0)  # floor: 30 + 17 steps x 26 = 472; 32: 30 + 1 + 7 x 42 = 325
    assert arbiter().decide(view(3, late, [victim("d3")])) == Decision(32, "swap", ("d3",))
    # the one victim frees too little for 32 (or 64): no swap
    assert arbiter().decide(view(3, late, [victim("d3", 4)])) == Decision(FLOOR, "shrink")


def test_unknown_arbiter_is_refused():
    with pytest.raises(ValueError):
        arbiter("kv_last")


# ---- the real scheduler and KV manager (host backend) ------------------------------------------------------
NOW = 1000.0


@pytest.fixture
def make_scheduler():
    """make_scheduler(mode, free_chunks): 4 decodes of 30 + 1 tokens (2 pages each) and, admitted after
    them, a prompt of 100 tokens with 16 computed that arrived 50 ms ago; the pool holds exactly their KV
    plus `free_chunks`. Two layers: a 16-token page is 4 chunks (K and V per layer)."""
    opened = []

    def make(mode: str, free_chunks: int) -> Scheduler:
        spec = KVCacheSpec(num_layers=2, num_kv_heads=2, head_dim=128, dtype_bytes=4,
                           groups=(LayerGroup((0, 1), None),), max_slots=8, max_len=128, tokens_per_page=16)
        pool = ElasticPool(create_backend("host"), (4 * 8 + 4 + free_chunks) * spec.page_bytes, spec.page_bytes)
        kv = KVCacheManager(spec, pool, torch.float32, host_buffer=HostBuffer(64 * spec.page_bytes, spec.page_bytes),
                            enable_prefix_caching=False)
        opened.append((kv, pool))
        activation = lambda tokens, rows: tokens // 8  # noqa: E731
        policy = AdaptiveChunkPolicy(FLOOR, CEILING, activation, lambda t: kv.chunks_to_grow(None, t))
        config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=FLOOR, max_model_len=128,
                                 ttft_slo_ms=200.0, memory_arbiter=mode)
        scheduler = Scheduler(config, kv, activation, StepCostModel(base_ms=10.0, per_token_ms=1.0), policy,
                              clock=lambda: NOW)
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        for index in range(4):
            request = Request(f"d{index}", list(range(30)), params, SamplingState(params), None, NOW - 0.06)
            request.output_token_ids.append(7)
            request.first_token_time = NOW - 0.01
            _running(scheduler, request, 30)
        _running(scheduler, Request("p", list(range(100)), params, SamplingState(params), None, NOW - 0.05), 16)
        return scheduler

    yield make
    for kv, pool in opened:
        kv.close()
        pool.close()


def _running(scheduler: Scheduler, request: Request, computed: int) -> None:
    scheduler.requests[request.request_id] = request
    scheduler.kv.admit(request.request_id, request.all_token_ids)
    assert scheduler.kv.grow(request.request_id, computed)
    request.num_computed_tokens = computed
    request.status = RequestStatus.RUNNING
    scheduler.running.append(request)


def test_scheduler_swaps_the_youngest_decode_for_a_larger_chunk_when_the_prompt_would_miss_ttft(make_scheduler):
    # 8 chunks free: the floor (16 tokens: 4 decodes + 12 of the prompt: 7 steps of 26 ms, 232 ms with the
    # 50 ms waited) misses 200 ms; 32 needs 4 (workspace) + 4 (the prompt's next page) + 8 (its prefill's
    # KV) = 16 chunks: swapping d3 gives 8, and then 3 steps of 42 ms meet the target
    scheduler = make_scheduler("slo", free_chunks=8)
    plan = scheduler.schedule()
    assert plan.preempted == ("d3",) and [r.request_id for r in scheduler.swapped] == ["d3"]
    assert [chunk.request_id for chunk in plan.decodes] == ["d0", "d1", "d2"]
    assert [(chunk.request_id, chunk.start, len(chunk.token_ids)) for chunk in plan.prefills] == [("p", 16, 29)]
    assert scheduler.arbiter.actions == {"swap": 1} and scheduler.num_swaps == 1


def test_scheduler_kv_first_shrinks_to_the_floor_in_the_same_state(make_scheduler):
    scheduler = make_scheduler("kv_first", free_chunks=8)
    plan = scheduler.schedule()
    assert plan.preempted == () and not scheduler.swapped
    assert [chunk.request_id for chunk in plan.decodes] == ["d0", "d1", "d2", "d3"]
    assert [(chunk.request_id, chunk.start, len(chunk.token_ids)) for chunk in plan.prefills] == [("p", 16, 12)]
    assert scheduler.arbiter.actions == {"shrink": 1}


def test_scheduler_slo_swaps_no_one_when_the_prompt_is_on_time(make_scheduler):
    scheduler = make_scheduler("slo", free_chunks=8)
    scheduler.requests["p"].arrival_time = NOW  # 182 ms at the floor: within 200
    plan = scheduler.schedule()
    assert plan.preempted == () and scheduler.arbiter.actions == {"shrink": 1}
