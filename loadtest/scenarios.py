"""Named load tests: which prompts, which users, which shape. `python -m loadtest.run --scenario NAME`.

A scenario turns the command line's settings into a `RunPlan`; what the settings leave open, the scenario
decides. Every plan is deterministic (seeded), so two servers measured with the same scenario and
settings receive the same prompts, lengths and arrival times.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loadtest.shapes import ShapeSpec
from loadtest.workloads import FixedLengths, LongContext, PoolSpec, SharedPrefix, ShareGptLike

MAX_SESSIONS = 10_000  # beyond this a run repeats prompts (logged); it keeps workload files small


@dataclass(frozen=True)
class RunSettings:
    duration_s: float = 60.0
    users: int | None = None  # closed-loop users (the base load for spike and long-context)
    rate_per_s: float | None = None  # open-loop arrival rate
    context_tokens: int = 4096  # the model's context, for long-context prompts
    prompt_tokens: int | None = None  # override of fixed-length scenarios
    output_tokens: int | None = None
    burst_size: int | None = None  # requests of a one-shot burst
    seed: int = 0

    def __post_init__(self) -> None:
        if self.duration_s <= 0:
            raise ValueError("duration_s must be positive")
        if self.users is not None and self.users < 1:
            raise ValueError("users must be >= 1")
        if self.rate_per_s is not None and self.rate_per_s <= 0:
            raise ValueError("rate must be positive")
        if self.burst_size is not None and self.burst_size < 1:
            raise ValueError("burst_size must be >= 1")


@dataclass(frozen=True)
class RunPlan:
    shape: ShapeSpec
    user_classes: tuple[str, ...]  # Locust user classes in loadtest/locustfile.py
    pools: dict[str, PoolSpec]
    endpoint: str = "completions"  # of the open-loop user


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    build: Callable[[RunSettings], RunPlan]


def closed_loop_sessions(users: int, duration_s: float, requests_per_user_s: float) -> int:
    """Enough sessions that a fast server does not run out: each user at `requests_per_user_s`."""
    return max(64, min(MAX_SESSIONS, int(users * duration_s * requests_per_user_s) + 16))


def open_loop_sessions(rate_per_s: float, duration_s: float) -> int:
    return max(16, min(MAX_SESSIONS, int(rate_per_s * duration_s * 1.5) + 16))


def _fixed(settings: RunSettings, users: int) -> PoolSpec:
    """Fixed lengths (128/128 unless overridden), enough for `users` closed-loop users on a fast server
    (4 requests/s each at 128 output tokens)."""
    distribution = FixedLengths(settings.prompt_tokens or 128, settings.output_tokens or 128)
    requests_per_user_s = 4.0 * 128 / distribution.num_output_tokens
    return PoolSpec(distribution, closed_loop_sessions(users, settings.duration_s, requests_per_user_s))


def _steady(default_users: int) -> Callable[[RunSettings], RunPlan]:
    def build(settings: RunSettings) -> RunPlan:
        users = settings.users or default_users
        return RunPlan(
            shape=ShapeSpec("steady", {"users": users, "duration_s": settings.duration_s}),
            user_classes=("CompletionsUser",),
            pools={"main": _fixed(settings, users)},
        )

    return build


def _sharegpt(settings: RunSettings) -> RunPlan:
    users = settings.users or 16
    return RunPlan(
        shape=ShapeSpec("steady", {"users": users, "duration_s": settings.duration_s}),
        user_classes=("ChatUser",),
        pools={"main": PoolSpec(ShareGptLike(), closed_loop_sessions(users, settings.duration_s, 2.0))},
    )


def _poisson(settings: RunSettings) -> RunPlan:
    rate = settings.rate_per_s or 2.0
    return RunPlan(
        shape=ShapeSpec("poisson", {"rate_per_s": rate, "duration_s": settings.duration_s, "seed": settings.seed}),
        user_classes=("OpenLoopUser",),
        pools={"main": PoolSpec(_fixed(settings, 1).distribution, open_loop_sessions(rate, settings.duration_s))},
    )


def _spike(settings: RunSettings) -> RunPlan:
    base = settings.users or 4
    multiple = 4.0
    duration = settings.duration_s
    params = {
        "base_users": base,
        "multiple": multiple,
        "spike_start_s": round(duration / 3, 3),
        "spike_s": round(duration / 3, 3),
        "duration_s": duration,
    }
    return RunPlan(
        shape=ShapeSpec("spike", params),
        user_classes=("CompletionsUser",),
        pools={"main": _fixed(settings, round(base * multiple))},
    )


def _step_ramp(settings: RunSettings) -> RunPlan:
    top = settings.users or 32
    steps = 8
    params = {
        "start_users": max(1, top // steps),
        "step_users": max(1, top // steps),
        "step_s": round(settings.duration_s / steps, 3),
        "max_users": top,
        "duration_s": settings.duration_s,
    }
    return RunPlan(
        shape=ShapeSpec("step-ramp", params),
        user_classes=("CompletionsUser",),
        pools={"main": _fixed(settings, top)},
    )


def _long_context(settings: RunSettings) -> RunPlan:
    base = settings.users or 4
    duration = settings.duration_s
    burst_size = 4
    period = max(1.0, round(duration / 3, 3))
    params = {
        "base_users": base,
        "burst_size": burst_size,
        "first_burst_s": round(period / 2, 3),
        "period_s": period,
        "duration_s": duration,
    }
    num_bursts = int((duration - period / 2) // period) + 1
    return RunPlan(
        shape=ShapeSpec("long-context-burst", params),
        user_classes=("CompletionsUser", "OpenLoopUser"),
        pools={
            "main": _fixed(settings, max(1, base)),
            "burst": PoolSpec(
                LongContext(context_tokens=settings.context_tokens, num_output_tokens=32), burst_size * num_bursts
            ),
        },
    )


def _shared_prefix(settings: RunSettings) -> RunPlan:
    users = settings.users or 8
    distribution = SharedPrefix(target_hit_rate=0.75, num_turns=4, user_tokens=64, num_output_tokens=64)
    sessions = closed_loop_sessions(users, settings.duration_s, 2.0 / distribution.num_turns)
    return RunPlan(
        shape=ShapeSpec("steady", {"users": users, "duration_s": settings.duration_s}),
        user_classes=("ChatUser",),
        pools={"main": PoolSpec(distribution, sessions)},
    )


def _layerkv_burst(settings: RunSettings) -> RunPlan:
    """LayerKV's queued burst through a server: N long-output requests at once, one each, until all are answered
    (docs/LAYERKV.md, `python -m loadtest.bench.layerkv_serve`)."""
    size = settings.burst_size or 8
    distribution = FixedLengths(settings.prompt_tokens or 256, settings.output_tokens or 768)
    return RunPlan(
        shape=ShapeSpec("one-shot-burst", {"burst_size": size, "duration_s": settings.duration_s}),
        user_classes=("OpenLoopUser",),
        pools={"main": PoolSpec(distribution, size)},
    )


SCENARIOS: dict[str, Scenario] = {
    scenario.name: scenario
    for scenario in (
        Scenario("steady-8", "8 closed-loop users, 128-token prompts, 128 output tokens, /v1/completions", _steady(8)),
        Scenario(
            "steady-32", "32 closed-loop users, 128-token prompts, 128 output tokens, /v1/completions", _steady(32)
        ),
        Scenario("sharegpt", "16 closed-loop chat users, ShareGPT-like long-tailed lengths", _sharegpt),
        Scenario("poisson", "open-loop Poisson arrivals (--rate, default 2/s), 128 in / 128 out", _poisson),
        Scenario("spike", "4 users, 4x for the middle third of the run, then back; 128 in / 128 out", _spike),
        Scenario("step-ramp", "users grow in 8 steps up to --users (default 32); 128 in / 128 out", _step_ramp),
        Scenario(
            "long-context",
            "4 short closed-loop users; 3 bursts of 4 prompts at 75-95% of the context arrive at once",
            _long_context,
        ),
        Scenario(
            "shared-prefix",
            "8 chat users, 4-turn conversations behind a shared system prompt, 75% of prompt tokens a repeated prefix",
            _shared_prefix,
        ),
        Scenario(
            "layerkv-burst",
            "open loop, once: --burst-size (8) prompts of 256 tokens, 768 out, all at once; ends when all are answered",
            _layerkv_burst,
        ),
    )
}
