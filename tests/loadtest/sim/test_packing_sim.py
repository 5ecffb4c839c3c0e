"""The packing simulation: invariants of the simulated cluster (every request finishes exactly once, every
pool returns to idle, runs are deterministic, the KV layouts decide alike), the policies' plans on
hand-built snapshots (exact), traces and the cost model."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from loadtest.sim.model import GIB, CostModel, ModelShape, ReplicaConfig, kv_spec
from loadtest.sim.packing import Cluster, SimConfig, main, run_policies, simulate
from loadtest.sim.policies import (
    ClusterView,
    Migration,
    PackingPolicy,
    Plan,
    PolicyConfig,
    ReplicaView,
    RequestView,
    choose_mode,
    create_policy,
    plan_balance,
    plan_scale,
)
from loadtest.sim.replica import _steps_within
from loadtest.sim.trace import DiurnalTrace, TraceRequest, clip_to_context, load_trace

POLICY_NAMES = ("none", "balance", "drain", "balance+pack")
# 24 GB devices leave 29 pages of 1,024 tokens (3.6 GiB) of KV: a few long requests fill one, so
# preemption, balancing and packing all happen within a simulated hour.
SMALL_REPLICA = ReplicaConfig(gpu_bytes=24 * GIB)


def _config(policy: str, **changes) -> SimConfig:
    return SimConfig(policy=policy, num_replicas=3, replica=SMALL_REPLICA, scale_down_window_s=300.0, **changes)


@pytest.fixture(scope="module")
def busy_trace() -> tuple[TraceRequest, ...]:
    """An hour whose peak overloads three small replicas (they preempt) and whose trough does not."""
    return DiurnalTrace(hours=1, period_hours=1, peak_hour=0.25, mean_rate_per_s=0.28).generate(3)


@pytest.fixture(scope="module")
def trough_trace() -> tuple[TraceRequest, ...]:
    """Two hours: one busy, one nearly idle (peak / trough = 7)."""
    return DiurnalTrace(hours=2, period_hours=2, peak_hour=0.5, mean_rate_per_s=0.15).generate(5)


# ---- the simulated cluster ---------------------------------------------------------------------
class SlowCopies(PackingPolicy):
    """Every tick, copies each replica's largest request to the next replica, each copy taking 20 s: many
    finish or are preempted before the switch (the migration is abandoned), some no longer fit then."""

    name = "slow-copies"

    def sources(self, view, config):
        return frozenset(r.replica_id for r in view.replicas)

    def plan(self, view, config):
        moves = []
        for replica, target in zip(view.replicas, view.replicas[1:] + view.replicas[:1], strict=True):
            if replica.requests and replica is not target:
                request = max(replica.requests, key=lambda q: (q.num_chunks, q.request_id))
                moves.append(Migration(request.request_id, replica.replica_id, target.replica_id, "copy",
                                       request.num_kv_tokens, request.num_chunks, 20.0))
        return Plan(migrations=tuple(moves))


@pytest.mark.parametrize("policy", POLICY_NAMES + ("slow-copies",))
def test_every_request_finishes_once_and_pools_return_to_idle(busy_trace, policy):
    if policy == "slow-copies":
        cluster = Cluster(busy_trace, _config("none"), policy=SlowCopies())
    else:
        cluster = Cluster(busy_trace, _config(policy))
    result = cluster.run()
    assert cluster.finish_counts == [1] * len(busy_trace)
    for request, traced in zip(cluster.requests, busy_trace, strict=True):
        assert request.phase == "done" and request.generated == traced.output_tokens
        assert traced.arrival_s <= request.first_token_s <= request.finish_s <= result.end_s
    for replica in cluster.replicas:
        if replica.released_s is not None:  # released only when empty (release() checks), then closed
            assert replica.pool.is_closed and replica.name not in cluster.live
            continue
        telemetry = replica.pool.telemetry()
        assert telemetry.chunks_per_client == {"kv": 0}
        assert telemetry.num_free_chunks == telemetry.num_chunks == replica.pool.num_chunks
        assert not (replica.kv.requests or replica.running or replica.waiting or replica.incoming)
        assert replica.kv.num_free_slots == SMALL_REPLICA.max_num_seqs
    assert result.num_preemptions == sum(r.num_preemptions for r in cluster.requests) > 0
    migrations = sum(r.num_migrations for r in cluster.requests)
    assert migrations == result.num_copies + result.num_recomputes
    if policy == "slow-copies":
        assert min(result.num_copies, result.num_aborted, result.num_refused, result.num_fallbacks) > 0
    elif policy in ("balance", "balance+pack"):
        assert result.num_copies > 0 and result.bytes_moved > 0
    else:
        assert migrations == 0 and result.bytes_moved == 0


def test_runs_are_deterministic(busy_trace):
    first = simulate(busy_trace, _config("balance+pack"))
    assert simulate(busy_trace, _config("balance+pack")) == first
    assert run_policies(busy_trace, _config("none"), ["balance+pack", "drain"], jobs=2) == [
        first, simulate(busy_trace, _config("drain"))]


def test_packing_never_uses_more_replica_hours_than_a_fixed_fleet(trough_trace):
    results = {name: simulate(trough_trace, _config(name)) for name in ("none", "drain", "balance+pack")}
    fixed = results["none"]
    assert fixed.replica_hours == pytest.approx(3 * fixed.end_s / 3600, rel=1e-12)
    assert results["drain"].replica_hours <= fixed.replica_hours
    assert results["balance+pack"].replica_hours <= 0.9 * fixed.replica_hours
    assert results["balance+pack"].num_copies + results["balance+pack"].num_recomputes > 0


def test_a_policy_that_moves_nothing_changes_nothing(trough_trace):
    """On 80 GB replicas this trace never takes a replica above the high watermark: `balance` plans
    nothing, and its run is `none`'s exactly (the router sees the same telemetry)."""
    fixed = simulate(trough_trace, replace(_config("none"), replica=ReplicaConfig()))
    balanced = simulate(trough_trace, replace(_config("balance"), replica=ReplicaConfig()))
    assert balanced.num_copies == balanced.num_recomputes == 0
    assert replace(balanced, policy="none") == fixed


def test_kv_layouts_make_the_same_decisions(busy_trace):
    """The fused spec with the bookkeeping layout (the default) decides exactly as the engine's layout:
    one 2 MiB chunk per layer mapped into contiguous virtual tensors."""
    trace = tuple(t for t in busy_trace if t.arrival_s < 900)
    fast = simulate(trace, _config("balance+pack"))
    assert fast.num_preemptions > 0 and fast.num_copies > 0
    assert simulate(trace, _config("balance+pack", kv_layout="contiguous")) == fast
    assert simulate(trace, _config("balance+pack", kv_layout="contiguous", fused_layers=False)) == fast


def test_cli_prints_the_table(tmp_path, capsys):
    path = tmp_path / "trace.csv"
    rows = [(i * 2.0, 300 + 50 * i, 200 + 10 * i) for i in range(40)]
    path.write_text("arrival,prompt_tokens,output_tokens\n" + "".join(f"{a},{p},{o}\n" for a, p, o in rows))
    assert main(["--trace", str(path), "--replicas", "2", "--jobs", "1", "--policies", "none,balance+pack"]) == 0
    out = capsys.readouterr().out
    assert "40 requests" in out and "replica-h" in out and "balance+pack / none: replica-hours x" in out


# ---- policies on hand-built snapshots ----------------------------------------------------------
CONFIG = PolicyConfig()


def _replica(name: str, used: int, requests: tuple[RequestView, ...] = (), state: str = "active",
             waiting_chunks: int = 0, num_waiting: int = 0) -> ReplicaView:
    return ReplicaView(name, state, num_kv_chunks=100, num_used_chunks=used, num_waiting_chunks=waiting_chunks,
                       num_running=len(requests), num_waiting=num_waiting, max_running=10, requests=requests)


def _requests(prefix: str, *chunks: int) -> tuple[RequestView, ...]:
    return tuple(RequestView(f"{prefix}{i}", num_kv_tokens=size * 500, num_chunks=size)
                 for i, size in enumerate(chunks))


def _view(*replicas: ReplicaView, peak: float = 1.0, max_replicas: int = 4) -> ClusterView:
    return ClusterView(0.0, replicas, max_replicas, peak)


def test_balance_moves_the_request_that_best_fits_half_the_gap():
    hot = _replica("a", 90, _requests("a", 10, 30, 20, 30))
    cold = _replica("b", 10, _requests("b", 10))
    plan = plan_balance(_view(hot, cold), CONFIG)
    (move,) = plan.migrations  # after it, a is at 60: below the high watermark
    assert (move.request_id, move.source, move.destination, move.num_chunks) == ("a3", "a", "b", 30)
    assert move.mode == "copy" and move.num_kv_tokens == 15000
    assert plan_balance(_view(_replica("a", 80, _requests("a", 40, 40)), cold), CONFIG) == Plan()  # not hot
    assert plan_balance(_view(hot, _replica("b", 60, _requests("b", 60))), CONFIG) == Plan()  # none cold


def test_copy_or_recompute_by_cost():
    cost, model = CONFIG.cost, CONFIG.model
    assert choose_mode(100, CONFIG) == ("recompute", cost.recompute_s(100))
    assert choose_mode(20000, CONFIG) == ("copy", cost.copy_s(20000, model))
    crossover = next(n for n in range(1, 20000) if cost.copy_s(n, model) <= cost.recompute_s(n))
    assert choose_mode(crossover - 1, CONFIG)[0] == "recompute" and choose_mode(crossover, CONFIG)[0] == "copy"


def test_pack_drains_the_least_loaded_replica_into_the_others():
    replicas = (_replica("a", 40, _requests("a", 20, 20)), _replica("b", 30, _requests("b", 30)),
                _replica("c", 15, _requests("c", 5, 10)))
    view = _view(*replicas, peak=0.85)  # ceil(0.85 / 0.7) = 2 replicas are enough
    drain_only = plan_scale(view, CONFIG, migrate=False)
    assert drain_only == Plan(drain=("c",))
    plan = plan_scale(view, CONFIG, migrate=True)
    assert plan.drain == ("c",) and plan.num_to_start == 0 and plan.release == ()
    # largest first, each to the replica with the most room at that moment
    assert [(m.request_id, m.destination) for m in plan.migrations] == [("c1", "b"), ("c0", "a")]
    assert [m.mode for m in plan.migrations] == ["copy", "copy"]


def test_scale_releases_empty_drained_replicas_reroutes_their_queue_and_grows_back():
    draining = _replica("c", 0, state="draining")
    assert plan_scale(_view(_replica("a", 50), draining, peak=0.5), CONFIG, migrate=True).release == ("c",)
    queued = _replica("c", 0, state="draining", waiting_chunks=8, num_waiting=2)
    plan = plan_scale(_view(_replica("a", 50), queued, peak=0.5), CONFIG, migrate=True)
    assert plan.reroute == ("c",) and plan.release == ()
    # demand rises: take the draining replica back first, then start new ones up to the ceiling
    plan = plan_scale(_view(_replica("a", 90), queued, peak=2.0), CONFIG, migrate=True)
    assert plan.undrain == ("c",) and plan.num_to_start == 1 and plan.drain == ()
    plan = plan_scale(_view(_replica("a", 90), queued, peak=5.0, max_replicas=3), CONFIG, migrate=True)
    assert plan.undrain == ("c",) and plan.num_to_start == 1  # 3 replicas at most


@pytest.mark.parametrize("name", ["balance", "balance+pack"])
def test_views_listing_only_the_sources_give_the_same_plan(name):
    policy = create_policy(name)
    rng = random.Random(11)
    for _ in range(200):
        replicas = []
        for index in range(rng.randint(2, 5)):
            sizes = [rng.randint(1, 12) for _ in range(rng.randint(0, 9))]
            state = rng.choice(["active", "active", "active", "draining", "starting"])
            replicas.append(_replica(f"r{index}", sum(sizes), _requests(f"r{index}-", *sizes), state=state))
        if not any(r.state == "active" for r in replicas):
            continue
        full = _view(*replicas, peak=rng.uniform(0.0, 4.0))
        sources = policy.sources(full, CONFIG)
        stripped = replace(full, replicas=tuple(r if r.replica_id in sources else replace(r, requests=())
                                                for r in full.replicas))
        assert policy.plan(stripped, CONFIG) == policy.plan(full, CONFIG)


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="unknown packing policy"):
        create_policy("pack-everything")
    with pytest.raises(ValueError):
        PolicyConfig(low_watermark=0.9, high_watermark=0.8)
    with pytest.raises(ValueError):
        _replica("a", 10, state="sleeping")
    with pytest.raises(ValueError):
        CostModel(prefill_per_token_s=-1.0)
    with pytest.raises(ValueError):
        SimConfig(policy="nope")


# ---- traces, specs and the cost model ----------------------------------------------------------
def test_synthetic_trace_is_seeded_and_follows_the_day():
    trace = DiurnalTrace(mean_rate_per_s=0.2).generate(7)
    assert trace == DiurnalTrace(mean_rate_per_s=0.2).generate(7) != DiurnalTrace(mean_rate_per_s=0.2).generate(8)
    per_hour = [sum(1 for t in trace if hour * 3600 <= t.arrival_s < (hour + 1) * 3600) for hour in range(24)]
    assert per_hour[15] > 4 * per_hour[3]  # peak at 15:00, trough at 03:00: 7x in rate
    assert all(16 <= t.prompt_tokens <= 16384 and 64 <= t.output_tokens <= 16384 for t in trace)
    assert list(trace) == sorted(trace, key=lambda t: t.arrival_s)


def test_trace_files(tmp_path):
    rows = [{"arrival": 3.5, "prompt_tokens": 10, "output_tokens": 4}, {"arrival": 1.0, "prompt_tokens": 7,
                                                                          "output_tokens": 2}]
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("arrival,prompt_tokens,output_tokens,user\n3.5,10,4,x\n1.0,7,2,y\n")
    expected = (TraceRequest(1.0, 7, 2), TraceRequest(3.5, 10, 4))
    assert load_trace(jsonl) == load_trace(csv_file) == expected
    (tmp_path / "bad.csv").write_text("arrival,prompt\n1,2\n")
    with pytest.raises(ValueError, match="output_tokens"):
        load_trace(tmp_path / "bad.csv")
    assert clip_to_context((TraceRequest(0.0, 5000, 5000),), 4096) == (TraceRequest(0.0, 4095, 1),)


def test_fused_and_per_layer_specs_hold_the_same_pages():
    model, replica = ModelShape(), ReplicaConfig()
    fused, per_layer = kv_spec(model, replica, True), kv_spec(model, replica, False)
    assert per_layer.page_bytes == 2 << 20 and fused.page_bytes == 64 << 20
    assert 2 * fused.num_layers * fused.page_bytes == 2 * per_layer.num_layers * per_layer.page_bytes
    assert fused.page_bytes * 2 == replica.tokens_per_page * model.kv_bytes_per_token == 128 << 20
    budget = replica.kv_budget_bytes(model)
    assert budget % (128 << 20) == 0 and budget // (128 << 20) == 432  # 442,368 tokens of Llama-3-8B KV


def test_steps_within_is_the_number_of_whole_steps():
    rng = random.Random(3)

    def elapsed(alpha: float, beta: float, steps: int) -> float:  # step i lasts alpha + beta * i
        return alpha * steps + beta * steps * (steps - 1) / 2

    for _ in range(2000):
        alpha, beta = rng.uniform(1e-3, 5e-2), rng.choice([0.0, rng.uniform(0, 1e-3)])
        seconds = rng.uniform(0, 50)
        steps = _steps_within(alpha, beta, seconds)
        assert elapsed(alpha, beta, steps) <= seconds < elapsed(alpha, beta, steps + 1)
    assert _steps_within(0.01, 0.0, 0.0) == 0 and _steps_within(0.01, 0.001, 0.01) == 1
