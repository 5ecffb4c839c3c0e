"""Packing simulation: replica-hours with and without Mell-style online packing, over a request trace.

    python -m loadtest.sim.packing [--trace synthetic|FILE] [--hours H] [--replicas N] [--seed S]

A discrete-event simulation of a cluster of replicas. Each replica has a real ElasticPool and
KVCacheManager on the `sim` VMM backend (Llama-3-8B KV on an 80 GB device, see packing_model.py) and a
cost model instead of compute (packing_replica.py). Requests arrive from the trace and are routed to the
active replica with the most KV headroom. Every `tick_s` the policy (packing_policies.py) sees a
snapshot of the cluster and returns a plan: migrations (copy the KV or recompute it, whichever is
cheaper), replicas to drain, release or start (a new one serves after `startup_s`). The same trace runs
under each policy; the table reports replica-hours, latency, preemptions, migrations and SLO attainment.

The policies compared: `none` and `balance` keep the fleet of N replicas all day; `drain` autoscales
without migration (a drained replica is released once its requests have finished on their own);
`balance+pack` drains by migrating. So `balance+pack / none` is what autoscaling with packing saves
over a fleet sized for the peak, and `balance+pack / drain` is what migration adds to autoscaling.

Speed: the KV spec folds the 32 layers into one (2 chunks of 64 MiB per 1,024-token page instead of 64
of 2 MiB) and the KV layout only keeps books (no virtual tensor is mapped); both make the manager
decide exactly as the engine's layout does (tested), and `--exact-kv` runs the engine's instead.
Decode-only steps run in closed-form batches between the steps where something must be decided.
A simulated day of the default trace takes ~25 s of CPU per policy; `--jobs` runs policies in parallel.
"""

from __future__ import annotations

import argparse
import heapq
import os
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from loadtest.sim.model import ModelShape, ReplicaConfig, kv_spec
from loadtest.sim.policies import (
    ClusterView,
    Migration,
    PackingPolicy,
    PolicyConfig,
    cluster_demand,
    create_policy,
)
from loadtest.sim.replica import SimReplica, SimRequest
from loadtest.sim.report import SimResult, format_table
from loadtest.sim.trace import DiurnalTrace, TraceRequest, clip_to_context, load_trace

_WAKE, _TICK, _READY, _COMMIT = range(4)
_STUCK_AFTER_S = 6 * 3600.0  # far longer than any request takes
# One replica of the default workload serves ~0.66 req/s before KV preemptions pile up (measured here)
DEFAULT_RATE_PER_REPLICA = 0.33


@dataclass(frozen=True)
class SimConfig:
    policy: str = "none"
    num_replicas: int = 4  # the fleet: fixed for `none` / `balance`, the ceiling for autoscaling policies
    tick_s: float = 10.0  # how often the controller plans
    scale_down_window_s: float = 600.0  # the fleet is sized to the peak demand of this window (Ray Serve's
    # default downscale_delay_s)
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    fused_layers: bool = True  # see packing_model.kv_spec: same decisions, 32x fewer VMM calls
    kv_layout: str = "bookkeeping"  # or "contiguous", the engine's (same decisions, ~3x slower)
    model: ModelShape = field(default_factory=ModelShape)
    replica: ReplicaConfig = field(default_factory=ReplicaConfig)
    policy_config: PolicyConfig = field(default_factory=PolicyConfig)

    def __post_init__(self) -> None:
        create_policy(self.policy)  # fails early on an unknown name
        if self.num_replicas < 1 or self.tick_s <= 0 or self.scale_down_window_s < 0:
            raise ValueError("num_replicas >= 1, tick_s > 0 and scale_down_window_s >= 0 are required")


@dataclass
class _Copy:
    request: SimRequest
    source: SimReplica
    destination: SimReplica
    num_kv_tokens: int
    is_abandoned: bool = False


class Cluster:
    def __init__(self, trace: tuple[TraceRequest, ...], config: SimConfig, policy: PackingPolicy | None = None) -> None:
        self.config = config
        self.policy = policy or create_policy(config.policy)  # a policy object passed in wins over the name
        self.spec = kv_spec(config.model, config.replica, config.fused_layers)
        self.budget_bytes = config.replica.kv_budget_bytes(config.model)
        trace = clip_to_context(trace, config.replica.max_model_len)
        self.requests = [SimRequest(i, t.arrival_s, t.prompt_tokens, t.output_tokens) for i, t in enumerate(trace)]
        self.finish_counts = [0] * len(self.requests)
        self.replicas: list[SimReplica] = []  # every replica ever started, in start order
        self.live: dict[str, SimReplica] = {}
        self._events: list[tuple] = []
        self._seq = 0
        self._demand: deque[tuple[float, float]] = deque()  # (time, demand), demand decreasing
        self.counts = dict.fromkeys(("copies", "recomputes", "aborted", "refused", "fallbacks", "bytes_moved"), 0)
        self.num_live_peak = 0
        self.num_finished = 0
        self._last_progress_s = 0.0
        self._num_arrived = 0
        for _ in range(config.num_replicas):
            self._start_replica(0.0, "active")

    # ---- the loop ------------------------------------------------------------------------------
    def run(self) -> SimResult:
        # every policy ticks (`none` plans nothing): replicas stop at the same boundaries, so the router sees
        # the same telemetry and only what a policy does sets runs apart
        self._push(self.config.tick_s, _TICK, None)
        next_arrival, num_requests = 0, len(self.requests)
        while self.num_finished < num_requests:
            arrival_s = self.requests[next_arrival].arrival_s if next_arrival < num_requests else float("inf")
            if self._events and self._events[0][0] < arrival_s:
                now, _, kind, payload = heapq.heappop(self._events)
                self._handle(now, kind, payload)
            elif next_arrival < num_requests:
                self._route(arrival_s, self.requests[next_arrival])
                next_arrival += 1
            else:
                raise AssertionError("requests are left but nothing will happen: the simulation is stuck")
        end_s = max(request.finish_s for request in self.requests)
        return self.summary(end_s)

    def summary(self, end_s: float) -> SimResult:
        """The run's numbers, all requests having finished by `end_s`."""
        config = self.config
        requests = self.requests
        ttft = np.array([r.first_token_s - r.arrival_s for r in requests])
        tpot = np.array([(r.finish_s - r.first_token_s) / (r.output - 1) if r.output > 1 else 0.0
                         for r in requests])
        meets = (ttft <= config.slo_ttft_s) & (tpot <= config.slo_tpot_s)
        seconds = sum((r.released_s if r.released_s is not None else end_s) - r.started_s for r in self.replicas)
        counts = self.counts
        return SimResult(
            policy=config.policy, num_requests=len(requests), end_s=end_s, replica_hours=seconds / 3600,
            peak_replicas=self.num_live_peak, ttft_p50_s=float(np.percentile(ttft, 50)),
            ttft_p99_s=float(np.percentile(ttft, 99)), tpot_p99_s=float(np.percentile(tpot, 99)),
            num_preemptions=sum(r.num_preemptions for r in self.replicas), num_copies=counts["copies"],
            num_recomputes=counts["recomputes"], num_aborted=counts["aborted"], num_refused=counts["refused"],
            num_fallbacks=counts["fallbacks"], bytes_moved=counts["bytes_moved"],
            slo_attainment=float(meets.mean()))

    def _push(self, when: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._events, (when, self._seq, kind, payload))

    def _handle(self, now: float, kind: int, payload: object) -> None:
        if kind == _WAKE:
            replica, version = payload
            if version == replica.plan_version and replica.released_s is None:
                replica.wake()
                self._schedule(replica)
        elif kind == _TICK:
            self._tick(now)
            if self.num_finished < len(self.requests):
                if self._num_arrived > self.num_finished and now - self._last_progress_s > _STUCK_AFTER_S:
                    raise AssertionError(f"no request finished or arrived for {_STUCK_AFTER_S} s: stuck")
                self._push(now + self.config.tick_s, _TICK, None)
        elif kind == _READY:
            payload.sync(now)
            payload.state = "active"
            self._schedule(payload)
        else:
            self._commit(now, payload)

    def _schedule(self, replica: SimReplica) -> None:
        replica.plan_version += 1
        when = replica.schedule()
        if when is not None:
            self._push(when, _WAKE, (replica, replica.plan_version))

    def _on_finish(self, request: SimRequest) -> None:
        self.finish_counts[request.index] += 1
        self.num_finished += 1
        self._last_progress_s = request.finish_s

    # ---- routing -------------------------------------------------------------------------------
    def _route(self, now: float, request: SimRequest) -> None:
        """To the active replica with the most KV headroom (then the fewest requests, then the oldest)."""
        self._last_progress_s = now
        self._num_arrived += request.phase == "new"
        candidates = [r for r in self.live.values() if r.state == "active"]
        replica = max(candidates, key=lambda r: (r.headroom(), -len(r.running) - len(r.waiting)))
        replica.sync(now)
        replica.enqueue(request)
        self._schedule(replica)

    # ---- the controller ------------------------------------------------------------------------
    def _start_replica(self, now: float, state: str) -> SimReplica:
        replica = SimReplica(f"replica-{len(self.replicas)}", self.spec, self.budget_bytes, self.config.replica,
                             self.config.policy_config.cost, self._on_finish, now, state, self.config.kv_layout,
                             self._abandon)
        self.replicas.append(replica)
        self.live[replica.name] = replica
        self.num_live_peak = max(self.num_live_peak, len(self.live))
        return replica

    def _tick(self, now: float) -> None:
        for replica in self.live.values():
            replica.sync(now)
        views = tuple(replica.view(with_requests=False) for replica in self.live.values())
        demand = cluster_demand(views)
        while self._demand and (self._demand[-1][1] <= demand):
            self._demand.pop()
        self._demand.append((now, demand))
        while self._demand[0][0] < now - self.config.scale_down_window_s:
            self._demand.popleft()
        view = ClusterView(now, views, self.config.num_replicas, self._demand[0][1])
        sources = self.policy.sources(view, self.config.policy_config)
        if sources:  # only the replicas a plan may move requests from list them (the plan is the same)
            view = replace(view, replicas=tuple(self.live[v.replica_id].view() if v.replica_id in sources else v
                                                for v in views))
        plan = self.policy.plan(view, self.config.policy_config)
        for _ in range(plan.num_to_start):
            replica = self._start_replica(now, "starting")
            self._push(now + self.config.replica.startup_s, _READY, replica)
        for name in plan.undrain:
            self.live[name].state = "active"
        for name in plan.drain:
            self.live[name].state = "draining"
        for migration in plan.migrations:
            self._migrate(now, migration)
        rerouted = [request for name in plan.reroute for request in self.live[name].take_waiting()]
        for name in plan.release:
            self.live.pop(name).release(now)
        for replica in self.live.values():
            self._schedule(replica)
        for request in rerouted:
            self._route(now, request)

    def _migrate(self, now: float, migration: Migration) -> None:
        source, destination = self.live[migration.source], self.live[migration.destination]
        request = source.running.get(migration.request_id)
        if request is None or request.phase != "decode" or request.outgoing is not None:
            self.counts["refused"] += 1
            return
        if migration.mode == "recompute":
            source.detach(request)
            destination.sync(now)
            destination.enqueue(request, front=True)
            request.num_migrations += 1
            self.counts["recomputes"] += 1
            return
        if not destination.reserve_import(request, migration.num_kv_tokens):
            self.counts["refused"] += 1
            return
        request.outgoing = _Copy(request, source, destination, migration.num_kv_tokens)
        self._push(now + migration.seconds, _COMMIT, request.outgoing)

    def _commit(self, now: float, copy: _Copy) -> None:
        """The last stage of a live copy: the source pauses the request, the destination resumes it."""
        if copy.is_abandoned:
            return
        request, source, destination = copy.request, copy.source, copy.destination
        source.sync(now)
        destination.sync(now)
        if request.outgoing is copy:  # (syncing may have finished or preempted it: then it was abandoned)
            request.outgoing = None
            source.detach(request)
            num_tokens = request.prompt + request.generated - 1  # all stages together copy the KV there is now
            self.counts["bytes_moved"] += num_tokens * self.config.model.kv_bytes_per_token
            request.num_migrations += 1
            self.counts["copies"] += 1
            if not destination.attach(request, copy.num_kv_tokens):
                self.counts["fallbacks"] += 1
        self._schedule(source)
        self._schedule(destination)

    def _abandon(self, request: SimRequest, copy: _Copy) -> None:
        """The source finished or preempted a request it was copying: the destination frees its pages."""
        copy.is_abandoned = True
        copy.destination.cancel_import(request)
        self.counts["aborted"] += 1


def simulate(trace: tuple[TraceRequest, ...], config: SimConfig) -> SimResult:
    return Cluster(trace, config).run()


def _run_one(args: tuple[tuple[TraceRequest, ...], SimConfig]) -> SimResult:
    started = time.perf_counter()
    result = simulate(*args)
    return replace(result, wall_s=time.perf_counter() - started)


def run_policies(trace: tuple[TraceRequest, ...], config: SimConfig, policies: list[str],
                 jobs: int = 1) -> list[SimResult]:
    work = [(trace, replace(config, policy=name)) for name in policies]
    if jobs <= 1 or len(work) == 1:
        return [_run_one(item) for item in work]
    import multiprocessing

    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("fork")) as pool:
        return list(pool.map(_run_one, work))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trace", default="synthetic", help="'synthetic' or a CSV/JSONL file "
                        "(arrival, prompt_tokens, output_tokens)")
    parser.add_argument("--hours", type=float, default=24.0, help="synthetic: its length; a file: cut after")
    parser.add_argument("--replicas", type=int, default=4, help="fleet size (the ceiling when autoscaling)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None, help="synthetic: mean requests/s (default "
                        f"{DEFAULT_RATE_PER_REPLICA} per replica: the peak, 1.75x the mean, is ~85%% of what the "
                        "fleet serves before preemptions pile up)")
    parser.add_argument("--policies", default="none,balance,drain,balance+pack")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--exact-kv", action="store_true", help="the engine's KV layout: one 2 MiB chunk per "
                        "layer, mapped into contiguous virtual tensors (same decisions, over 10x slower)")
    args = parser.parse_args(argv)
    config = SimConfig(num_replicas=args.replicas)
    if args.exact_kv:
        config = replace(config, fused_layers=False, kv_layout="contiguous")
    if args.trace == "synthetic":
        rate = args.rate if args.rate is not None else DEFAULT_RATE_PER_REPLICA * args.replicas
        trace = DiurnalTrace(hours=args.hours, mean_rate_per_s=rate).generate(args.seed)
        source = f"synthetic diurnal, {args.hours:g} h, mean {rate:.3g} req/s, seed {args.seed}"
    else:
        trace = tuple(t for t in load_trace(args.trace) if t.arrival_s <= args.hours * 3600)
        source = args.trace
    if not trace:
        print("the trace is empty", file=sys.stderr)
        return 1
    started = time.perf_counter()
    results = run_policies(trace, config, args.policies.split(","), args.jobs)
    print(f"trace: {source}: {len(trace)} requests; {args.replicas} replicas x {config.model.name} on "
          f"{config.replica.gpu_bytes / 2**30:.0f} GiB")
    print(describe(config))
    print(format_table(results))
    each = ", ".join(f"{result.policy} {result.wall_s:.0f} s" for result in results)
    print(f"simulated in {time.perf_counter() - started:.1f} s ({each}; {args.jobs} at a time)")
    return 0


def describe(config: SimConfig) -> str:
    """The constants a run used, in a few lines (printed above the table)."""
    model, replica, policy, cost = config.model, config.replica, config.policy_config, config.policy_config.cost
    kv_bytes = replica.kv_budget_bytes(model)
    page_bytes = replica.tokens_per_page * model.kv_bytes_per_token
    return "\n".join((
        f"model {model.name}: {model.kv_bytes_per_token >> 10} KiB of KV per token, {model.weight_bytes / 1e9:.2f} GB "
        f"of weights; replica: {replica.gpu_bytes / 2**30:.0f} GiB x {replica.gpu_memory_utilization} - weights - "
        f"{replica.activation_reserve_bytes / 2**30:.0f} GiB reserve = {kv_bytes / 2**30:.1f} GiB of KV "
        f"({kv_bytes // page_bytes} pages of {replica.tokens_per_page} tokens), {replica.max_num_seqs} seqs, "
        f"{replica.max_num_batched_tokens} tokens/step, start-up {replica.startup_s:.0f} s",
        f"cost: decode step {cost.decode_base_s * 1e3:g} ms + {cost.decode_per_seq_s * 1e6:g} us/seq + "
        f"{cost.decode_per_context_token_s * 1e9:g} ns/context token; prefill {cost.prefill_per_token_s * 1e6:g} "
        f"us/token + {cost.prefill_attention_per_pair_s * 1e9:g} ns/(query, key); KV copy "
        f"{cost.migration_bandwidth_bytes_per_s / 1e9:g} GB/s + {cost.migration_setup_s * 1e3:g} ms",
        f"controller: every {config.tick_s:g} s; balance {policy.low_watermark:g} -> {policy.high_watermark:g} of KV; "
        f"fleet sized to the {config.scale_down_window_s:g} s peak at {policy.target_load:g} load; "
        f"<= {policy.max_migrations_per_tick} migrations/tick, <= {policy.max_outgoing_per_replica} out and "
        f"{policy.max_incoming_per_replica} in per replica; SLO: TTFT <= {config.slo_ttft_s:g} s, "
        f"TPOT <= {config.slo_tpot_s * 1e3:g} ms"))


if __name__ == "__main__":
    sys.exit(main())
