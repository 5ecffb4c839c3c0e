"""One simulated replica: the engine's real Scheduler, KVCacheManager, ElasticPool and ActivationWorkspace on
the `sim` VMM backend, the cost-model executor instead of the ModelRunner, and a virtual clock.

`SimEngine` is built like the engine's rank (engine/device/rank.py): a pool of the device's memory (times
`gpu_memory_utilization`) holding the weights balloon, the KV cache and the activation workspace; under
the `static` pool policy the shares are fixed with the engine's own `static_split_chunks`. It exposes
what engine/migration.py reads (`scheduler`, `kv`, `kv_spec`, `runner`, `max_model_len`), so the live
migration functions (`request_loads`, `reserve`, `release`, `cancel`) run on it unchanged.

With `kv_offload: layerwise` (LayerKV) the replica also has a host buffer (slot bookkeeping only) and the
scheduler's real offloading policy (engine/core/offload_policy.py) admits prompts with top layers on the
host, demotes and promotes layers; the executor stages them as the runner does and the cost model charges
the copies (and the layers the scheduler demoted or promoted while planning: their bytes over PCIe before
the step). Layer-wise residency needs the model's real layers (`fuse_layers=False`). The scheduler's SLO
targets, its clock (the virtual one) and its step-cost model (fed every simulated step's time and staged
bytes, as LLMEngine.step feeds it measured ones) are the engine's.

`SimReplica` drives the engine's step loop `schedule() -> run() -> update()` on a virtual clock. A step
whose plan is decode-only, preempts nothing and admits nothing is *fast-forwarded*: the same batch
decodes on (nothing offloaded: a step that stages host pages, or may promote them, is planned alone),
step after step, with no KV change, until some request needs a new page, lets a page slide
out of its window, or finishes; those steps are applied in bulk (each request's tokens, computed count
and KV length advance together), and their times come from the cost model in one vectorised call. The
scheduler would plan exactly these steps (nothing it looks at changes in between; a test compares with
`fast_forward=False`, which calls `schedule()` every step). An event from outside (a request routed
here, a migration) first brings the replica to the end of the step in progress (`interrupt`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.core.request import Request
from engine.core.sampling_workspace import SampledRows
from engine.core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.core.step_cost import StepCostModel
from engine.core.ttft_growth import TtftGrowth, expected_ttft_s
from engine.device.activation_workspace import ActivationWorkspace
from engine.device.rank import static_split_chunks
from engine.device.weight_arena import WEIGHTS_CLIENT
from engine.sampling_params import SamplingParams
from loadtest.sim.cost import CostModel
from loadtest.sim.executor import BookkeepingHostBuffer, BookkeepingLayout, PagedBookkeepingLayout, SimExecutor
from loadtest.sim.hardware import get_device
from loadtest.sim.models import get_model
from loadtest.sim.sizing import DTYPE, ReplicaConfig, SharedDevice, kv_spec_for, peak_activation_bytes
from memory import ElasticPool
from memory.kv import KVCacheManager, KVCacheSpec, register_layout
from memory.kv.balloon import KVBalloon
from memory.kv.registry import layout_class
from memory.vmm.sim import SimBackend

__all__ = ["DTYPE", "ReplicaConfig", "SharedDevice", "SimEngine", "SimReplica", "kv_spec_for", "sim_request"]


class SimEngine:
    """The engine's memory and scheduling parts, sized for `config.model` on `config.device` (alone, or as
    one of the models of a `SharedDevice`). `clock` is the scheduler's idea of now (the replica's virtual
    time)."""

    def __init__(self, config: ReplicaConfig, clock: Callable[[], float] = time.monotonic,
                 shared: SharedDevice | None = None):
        self.config = config
        if config.kv_offload != "none" and (config.fuse_layers or not config.host_buffer_bytes):
            raise ValueError("kv_offload: layerwise needs fuse_layers=False (per-layer KV) and a host buffer")
        self.model = model = get_model(config.model)
        self.device = device = get_device(config.device)
        self.model_config = engine_model = model.engine_config()
        self.cost = CostModel(model, device)
        self.max_model_len = config.max_model_len
        self.kv_spec = spec = kv_spec_for(config)
        self.shared = shared
        self.weight_chunks: list = []  # (own pool) the weights balloon's chunks; the last ones are dropped first
        self.dropped: list = []
        register_layout(BookkeepingLayout)  # (idempotent) so that config.kv_layout may name them
        register_layout(PagedBookkeepingLayout)
        if shared is not None:
            self.pool, self.workspace, self.host_buffer = shared.pool, shared.workspace, None
            self.kv = KVCacheManager(spec, self.pool, DTYPE, layout=config.kv_layout, enable_prefix_caching=False,
                                     balloon=shared.balloon, owner=config.model)
        else:
            self.pool = self._own_pool(config, spec)
            balloon = KVBalloon(self.pool, page_policy=config.page_policy) \
                if layout_class(config.kv_layout).small_pages else None
            self.host_buffer = BookkeepingHostBuffer(config.host_buffer_bytes, spec.page_bytes) \
                if config.host_buffer_bytes else None
            self.kv = KVCacheManager(spec, self.pool, DTYPE, layout=config.kv_layout, host_buffer=self.host_buffer,
                                     enable_prefix_caching=False, balloon=balloon)
            self.workspace = ActivationWorkspace(self.pool, peak_activation_bytes(config))
        self.runner = SimExecutor(engine_model, DTYPE, self.workspace, self.cost, self.kv)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                            max_model_len=config.max_model_len, preemption_mode="recompute",
                            ttft_slo_ms=config.ttft_slo_ms, tpot_slo_ms=config.tpot_slo_ms,
                            kv_offload=config.kv_offload),
            self.kv, self.runner.activation_chunks_charged_to_kv,
            # the host link's rate as the engine would time it at start-up (learned from staged steps after)
            StepCostModel(copy_bytes_per_ms=1e-3 / self.cost.host_link_s(1)), clock=clock)

    def _own_pool(self, config: ReplicaConfig, spec: KVCacheSpec) -> ElasticPool:
        model, device = self.model, self.device
        chunk = spec.page_bytes
        budget = int(device.memory_bytes * config.gpu_memory_utilization) // chunk * chunk
        static_split = None
        if config.pool_policy == "static":
            reserved = peak_activation_bytes(config, config.static_activation_tokens)
            static_split = static_split_chunks(model.weight_bytes, reserved, budget, chunk)
            if static_split["kv"] < 1:
                raise ValueError(f"{model.name} on {device.name}: no room for KV beside the static reserve")
        pool = ElasticPool(SimBackend(granularity=config.granularity), budget, chunk, config.pool_policy,
                           static_split=static_split)
        pool.register(WEIGHTS_CLIENT)
        weight_chunks = -(-model.weight_bytes // chunk)
        if weight_chunks >= pool.num_chunks:
            raise ValueError(f"{model.name} ({model.weight_bytes / 1e9:.1f} GB) does not fit on {device.name}")
        self.weight_chunks = pool.inflate(WEIGHTS_CLIENT, weight_chunks)
        return pool

    # ---- KunServe: dropping and restoring layers' weights ------------------------------------------------
    @property
    def chunks_per_layer(self) -> int:
        """Pool chunks one decoder layer's weights free when dropped (each layer on pages of its own)."""
        return self.model.layer_params * self.model.dtype_bytes // self.pool.chunk_bytes

    def drop_layers(self, num_layers: int) -> int:
        """Deflates the weights balloon by `num_layers` layers' chunks (free for KV at once); returns them."""
        count = num_layers * self.chunks_per_layer
        if not 0 <= num_layers < self.model.num_layers or count > len(self.weight_chunks) - len(self.dropped):
            raise ValueError(f"cannot drop {num_layers} layers")
        kept = len(self.weight_chunks) - len(self.dropped) - count
        dropped = self.weight_chunks[kept:len(self.weight_chunks) - len(self.dropped)]
        self.pool.deflate(WEIGHTS_CLIENT, dropped)
        self.dropped = dropped + self.dropped
        return count

    def restore_layers(self) -> int:
        """Inflates the weights balloon back to every layer (PoolExhausted, changing nothing, if KV holds the
        memory); returns the chunks taken."""
        count = len(self.dropped)
        if count:
            chunks = self.pool.inflate(WEIGHTS_CLIENT, count)
            self.weight_chunks[len(self.weight_chunks) - count:] = chunks
        self.dropped = []
        return count

    def kv_capacity_chunks(self) -> int:
        """Chunks KV could ever hold (as LLMEngine.kv_capacity_chunks)."""
        shared = self.pool.num_chunks - self.pool.num_held(WEIGHTS_CLIENT) - self.runner.activation_chunks(
            self.config.max_num_batched_tokens, SampledRows.plain(1))
        share = self.pool.policy.headroom("kv", 0)
        return shared if share is None else min(share, shared)

    def fits(self, num_tokens: int) -> bool:
        return num_tokens <= self.max_model_len and \
            self.kv.chunks_to_grow(None, num_tokens) <= self.kv_capacity_chunks()

    @staticmethod
    def max_tokens(config: ReplicaConfig) -> int:
        """The longest request (prompt + output) a replica of this config accepts (LLMEngine.validate's rule)."""
        engine = SimEngine(config)
        low, high = 1, config.max_model_len
        while low < high:
            middle = (low + high + 1) // 2
            low, high = (middle, high) if engine.fits(middle) else (low, middle - 1)
        engine.close()
        return low

    def is_idle(self) -> bool:
        """No request and no KV held, on the device or the host (the workspace may keep pages: KV reclaims
        them on demand)."""
        host_used = self.host_buffer.used_bytes if self.host_buffer is not None else 0
        return not self.scheduler.has_work and not self.kv.requests and self.kv.num_used_chunks() == 0 \
            and host_used == 0

    def close(self) -> None:
        self.kv.close()
        if self.shared is None:
            self.workspace.close()
            self.pool.close()


def sim_request(request_id: str, num_prompt: int, max_tokens: int, arrival: float,
                output: tuple[int, ...] = ()) -> Request:
    """An engine Request with placeholder token ids (the simulator never looks at them)."""
    return Request(request_id, [0] * num_prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None, None,
                   arrival, output_token_ids=list(output))


@dataclass
class _Run:
    """Steps in flight: the real plan of the first, `len(ends)` steps in all (the rest replay it)."""

    plan: SchedulerOutput
    start: float
    ends: np.ndarray  # end times of the steps
    durations: np.ndarray  # each step's own time (on a shared device others' steps may come in between)
    planning_s: float = 0.0  # layers moved while planning, in the first step's duration (not in the engine's timer)


class SimReplica:
    def __init__(self, replica_id: str, config: ReplicaConfig, now: float,
                 on_finish: Callable[[Request, float], None], shared: SharedDevice | None = None):
        self.replica_id = replica_id
        self.now = now  # the engine's clock: the time of the schedule or the step end being applied
        self.engine = SimEngine(config, clock=lambda: self.now, shared=shared)
        self.config = config
        self.clock = now  # the last step boundary
        self.started_at = now
        self.on_finish = on_finish
        self.fast_forward = config.fast_forward  # a device shared by several engines turns it off while others run
        self._run: _Run | None = None
        self.version = 0  # bumped whenever the step in flight changes: older wake-ups are stale
        self.num_steps = 0
        self.num_schedules = 0
        self.max_decode_batch = 0  # the most requests decoding in one step
        self.decode_only_tokens = 0  # tokens of decode-only steps, and their time (decode throughput)
        self.decode_only_s = 0.0
        self.admitted_at: dict[str, float] = {}  # when each request's first prefill chunk was planned
        self.ttft = TtftGrowth()  # as LLMEngine keeps it: recent TTFT over the unloaded baseline

    @property
    def busy_until(self) -> float | None:
        """When the steps in flight end (None: between steps)."""
        return None if self._run is None else float(self._run.ends[-1])

    # ---- requests ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        scheduler = self.engine.scheduler
        request.arrived_unloaded = not scheduler.waiting and not scheduler.swapped  # as LLMEngine.add_request
        scheduler.add(request)

    def _expected_ttft_s(self, request: Request) -> float:
        return expected_ttft_s(self.engine.scheduler.cost_model, len(request.prompt_token_ids),
                               self.engine.config.max_num_batched_tokens)

    def ttft_growth(self, now: float) -> float:
        """LLMEngine.ttft_growth at `now`: the requests still queued for their first token count too."""
        queued = [(r.arrival_time, self._expected_ttft_s(r)) for r in self.engine.scheduler.waiting
                  if r.first_token_time is None]
        return self.ttft.growth(now, queued)

    # ---- the step loop ----------------------------------------------------------------------------
    def start(self, now: float) -> float | None:
        """Plans the next step(s) at `now` if idle between steps; returns when they end (None: nothing to do)."""
        if self._run is not None:
            return float(self._run.ends[-1])
        self.clock = max(self.clock, now)
        if not self.engine.scheduler.has_work:
            return None
        self.now = self.clock
        kv = self.engine.kv
        moved = kv.num_bytes_demoted + kv.num_bytes_promoted
        plan = self.engine.scheduler.schedule()
        self.num_schedules += 1
        if plan.is_empty:
            return None
        # layers demoted or promoted while planning were copied over PCIe before the step could run
        moved_s = self.engine.cost.host_link_s(kv.num_bytes_demoted + kv.num_bytes_promoted - moved)
        self.engine.runner.run(plan, ())
        self.max_decode_batch = max(self.max_decode_batch, len(plan.decodes))
        for chunk in plan.prefills:
            self.admitted_at.setdefault(chunk.request_id, self.clock)
        num_steps = self._replayable_steps(plan)
        if num_steps > 1:
            times = self.engine.runner.decode_steps_s([chunk.start + 1 for chunk in plan.decodes], num_steps)
        else:
            times = np.array([self.engine.runner.step_s(plan)])
        times[0] += moved_s
        self._run = _Run(plan, self.clock, self.clock + np.cumsum(times), np.asarray(times, dtype=np.float64),
                         moved_s)
        self.version += 1
        return float(self._run.ends[-1])

    def step_times(self) -> np.ndarray:
        """Durations of the steps in flight (empty: none)."""
        if self._run is None:
            return np.zeros(0)
        return self._run.durations

    def retime(self, ends: Sequence[float]) -> None:
        """Keeps only the first len(ends) steps in flight and makes them end at `ends` (a device shared with
        other engines interleaves its steps with theirs: loadtest/sim/device.py)."""
        if self._run is None or not 1 <= len(ends) <= len(self._run.ends):
            raise ValueError("retime keeps between one and all of the steps in flight")
        self._run.ends = np.asarray(ends, dtype=np.float64)
        self._run.durations = self._run.durations[:len(ends)]
        self.version += 1

    def complete(self, until: float | None = None) -> None:
        """Applies the steps in flight that end by `until` and the one in progress then (None: all)."""
        run, self._run = self._run, None
        if run is None:
            return
        self.version += 1
        num = len(run.ends) if until is None else min(len(run.ends), int(np.searchsorted(run.ends, until)) + 1)
        self._observe(run, num)
        self._update(run.plan, float(run.ends[0]))
        if num > 1:
            self._replay(run.plan, num - 1, float(run.ends[num - 1]))
        if not run.plan.prefills:
            self.decode_only_tokens += len(run.plan.decodes) * num
            self.decode_only_s += float(run.ends[num - 1]) - run.start
        self.clock = float(run.ends[num - 1])
        self.num_steps += num

    def interrupt(self, now: float) -> None:
        """Something from outside happens at `now`: finish the step in progress first."""
        if self._run is not None and now < float(self._run.ends[-1]):
            self.complete(until=now)

    def _observe(self, run: _Run, num: int) -> None:
        """What LLMEngine.step tells the scheduler's step-cost model after each step: its time and the bytes
        it staged from the host with their copy time (steps replayed in bulk were planned alike, staged none).
        The engine times a step from after planning: layers moved while planning are not in it."""
        model, executor = self.engine.scheduler.cost_model, self.engine.runner
        times = run.durations[:num] * 1e3
        times[0] -= run.planning_s * 1e3
        fetched = sum(fetched for fetched, _ in executor.last_staged)
        model.observe_step(run.plan.num_tokens, float(times[0]), fetched, self.engine.cost.host_link_s(fetched) * 1e3)
        for step_ms in times[1:]:
            model.observe(len(run.plan.decodes), float(step_ms))

    def _update(self, plan: SchedulerOutput, end: float) -> None:
        """LLMEngine.update without text: the sampled rows get a token; finished requests leave."""
        self.now = end
        scheduler = self.engine.scheduler
        sampled = [scheduler.requests[c.request_id] for c in plan.decodes] + [
            scheduler.requests[c.request_id] for c in plan.prefills if c.samples]
        scheduler.mark_computed(plan)
        for request in sampled:
            request.output_token_ids.append(0)
            if request.first_token_time is None:
                request.first_token_time = end
                self.ttft.observe(request.arrival_time, end, self._expected_ttft_s(request), request.arrived_unloaded)
            if len(request.output_token_ids) >= request.params.max_tokens or request.num_tokens >= self.max_model_len:
                scheduler.finish(request, "length")
                self.on_finish(request, end)

    def _replay(self, plan: SchedulerOutput, num: int, end: float) -> None:
        """`num` more decode steps of the same batch, in bulk (see the module doc)."""
        scheduler, kv = self.engine.scheduler, self.engine.kv
        self.now = end
        for chunk in plan.decodes:
            request = scheduler.requests[chunk.request_id]
            computed = request.num_computed_tokens + num
            kv.grow(request.request_id, computed)  # within its pages: maps nothing (the equivalence test checks)
            request.num_computed_tokens = computed
            request.output_token_ids.extend([0] * num)
            kv.commit(request.request_id, (), computed)
            if len(request.output_token_ids) >= request.params.max_tokens or request.num_tokens >= self.max_model_len:
                scheduler.finish(request, "length")
                self.on_finish(request, end)

    def _replayable_steps(self, plan: SchedulerOutput) -> int:
        """How many steps in a row the scheduler would plan exactly like `plan` (1: just this one)."""
        if not self.fast_forward or plan.prefills or plan.preempted or not plan.decodes \
                or self.engine.kv.num_offloaded_host_chunks:
            return 1
        scheduler, spec = self.engine.scheduler, self.engine.kv_spec
        page = spec.tokens_per_page
        steps = 1 << 14
        for chunk in plan.decodes:
            request = scheduler.requests[chunk.request_id]
            after = chunk.start + 1  # KV tokens once this step ran; step j >= 2 grows to after + j - 1
            left = min(request.params.max_tokens - len(request.output_token_ids) - 1,
                       self.max_model_len - request.num_tokens - 1)
            if left <= 0:
                return 1  # it finishes in this step: its KV is freed
            steps = min(steps, 1 + left, -(-after // page) * page - after + 1)
            for group in spec.groups:
                if group.sliding_window is not None:  # the step that lets a page slide out is the last one
                    if after > group.sliding_window and (after - group.sliding_window) % page == 0:
                        return 1  # this very step frees a page
                    dropped = max(0, after - group.sliding_window) // page
                    steps = min(steps, (dropped + 1) * page + group.sliding_window - after + 1)
        return max(1, steps)

    # ---- what it reports --------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def num_ongoing(self) -> int:
        scheduler = self.engine.scheduler
        return len(scheduler.running) + len(scheduler.waiting) + len(scheduler.swapped)

    def requests(self) -> list[Request]:
        return list(self.engine.scheduler.requests.values())
