"""When load happens: closed-loop user counts over time and open-loop arrival schedules, as Locust shapes.

Closed-loop users send their next request when the last one finishes, so a slow server slows its own load
and queueing stays hidden. The open-loop plans (Poisson, long-context bursts, a one-shot burst) instead
schedule arrivals in time, whatever the server does; one open-loop Locust user (`OpenLoopUser` in the
locustfile) fires them.

A plan is a frozen dataclass whose load is a pure function of time (`users_at`, `arrival_times`), tested
without Locust. `load_test_shape(plan)` wraps it in a Locust `LoadTestShape`. Locust is imported only there:
the runner imports this module to check a scenario's plan, and a process that imports locust gets gevent's
monkey-patching, which must never happen in the runner (it may have imported torch for the tokenizer).
Locust instantiates shapes without arguments and uses whichever `LoadTestShape` subclass it finds in the
locustfile's namespace, so the locustfile exports exactly one, chosen by the `LOADTEST_SHAPE` variable:
`LOADTEST_SHAPE=spike` or `LOADTEST_SHAPE='{"name": "spike", "base_users": 4, "duration_s": 60}'`.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

SPAWN_RATE = 100.0  # users per second: steps and spikes happen at once (Locust warns above 100)


class LoadPlan:
    """`users_at(t)`: users running `t` seconds into the test, None to end it. Open-loop plans also give
    `arrival_times()` and name the workload pool (`open_loop_pool`) the open-loop user draws from. A plan
    that `ends_when_answered` also ends the test as soon as its last arrival has its answer."""

    open_loop_pool: ClassVar[str | None] = None
    ends_when_answered: ClassVar[bool] = False
    duration_s: float

    def users_at(self, time_s: float) -> int | None:
        raise NotImplementedError

    def arrival_times(self) -> Iterator[float]:
        """Seconds since the test started, non-decreasing; empty for closed-loop plans."""
        return iter(())


# ---- closed loop -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Steady(LoadPlan):
    """A fixed number of closed-loop users for the whole run."""

    users: int = 8
    duration_s: float = 60.0

    def __post_init__(self) -> None:
        if self.users < 1 or self.duration_s <= 0:
            raise ValueError("users must be >= 1 and duration_s > 0")

    def users_at(self, time_s: float) -> int | None:
        return self.users if time_s < self.duration_s else None


@dataclass(frozen=True)
class StepRamp(LoadPlan):
    """start_users, then step_users more every step_s seconds, capped at max_users."""

    start_users: int = 1
    step_users: int = 4
    step_s: float = 15.0
    max_users: int = 32
    duration_s: float = 120.0

    def __post_init__(self) -> None:
        if self.start_users < 1 or self.step_users < 0 or self.step_s <= 0 or self.max_users < self.start_users:
            raise ValueError(f"invalid step ramp {self}")

    def users_at(self, time_s: float) -> int | None:
        if time_s >= self.duration_s:
            return None
        return min(self.max_users, self.start_users + self.step_users * int(time_s // self.step_s))


@dataclass(frozen=True)
class Spike(LoadPlan):
    """Base load, a sudden multiple of it for spike_s seconds, then back to base (the memory spike that
    ballooning and parameter dropping are for)."""

    base_users: int = 4
    multiple: float = 4.0
    spike_start_s: float = 20.0
    spike_s: float = 20.0
    duration_s: float = 60.0

    def __post_init__(self) -> None:
        if self.base_users < 1 or self.multiple < 1 or self.spike_s <= 0 or self.spike_start_s < 0:
            raise ValueError(f"invalid spike {self}")

    def users_at(self, time_s: float) -> int | None:
        if time_s >= self.duration_s:
            return None
        if self.spike_start_s <= time_s < self.spike_start_s + self.spike_s:
            return max(self.base_users, round(self.base_users * self.multiple))
        return self.base_users


# ---- open loop ---------------------------------------------------------------------------------------


def poisson_arrivals(rate_per_s: float, seed: int = 0) -> Iterator[float]:
    """Exponential gaps with mean 1/rate, seeded so two servers see the same arrival times."""
    rng = random.Random(f"poisson:{seed}")
    time_s = 0.0
    while True:
        time_s += rng.expovariate(rate_per_s)
        yield time_s


def burst_arrivals(first_s: float, period_s: float, burst_size: int) -> Iterator[float]:
    """`burst_size` arrivals at once at first_s, first_s + period_s, ..."""
    index = 0
    while True:
        at = first_s + index * period_s
        for _ in range(burst_size):
            yield at
        index += 1


@dataclass(frozen=True)
class Poisson(LoadPlan):
    """Open loop: requests arrive as a Poisson process, however long the server takes to answer them."""

    open_loop_pool: ClassVar[str | None] = "main"
    rate_per_s: float = 2.0
    duration_s: float = 60.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)) or self.duration_s <= 0:
            raise ValueError(f"invalid poisson {self}")

    def users_at(self, time_s: float) -> int | None:
        return 1 if time_s < self.duration_s else None  # the one open-loop user

    def arrival_times(self) -> Iterator[float]:
        for at in poisson_arrivals(self.rate_per_s, self.seed):
            if at >= self.duration_s:
                return
            yield at


@dataclass(frozen=True)
class LongContextBurst(LoadPlan):
    """Steady short traffic from closed-loop users, hit every period_s by a burst of prompts near the context
    length arriving at once: the case layer-wise KV and ballooning should keep the short requests' TTFT down."""

    open_loop_pool: ClassVar[str | None] = "burst"
    base_users: int = 4
    burst_size: int = 4
    first_burst_s: float = 10.0
    period_s: float = 20.0
    duration_s: float = 60.0

    def __post_init__(self) -> None:
        if self.base_users < 0 or self.burst_size < 1 or self.period_s <= 0 or self.first_burst_s < 0:
            raise ValueError(f"invalid long-context burst {self}")

    def users_at(self, time_s: float) -> int | None:
        # the closed-loop users plus the one open-loop user that fires the bursts
        return self.base_users + 1 if time_s < self.duration_s else None

    def arrival_times(self) -> Iterator[float]:
        for at in burst_arrivals(self.first_burst_s, self.period_s, self.burst_size):
            if at >= self.duration_s:
                return
            yield at


@dataclass(frozen=True)
class OneShotBurst(LoadPlan):
    """Open loop, once: `burst_size` requests arrive together at `at_s`, and the test ends when every one has
    its answer (or at `duration_s`): a burst's makespan, not a rate (LayerKV's queued prompts)."""

    open_loop_pool: ClassVar[str | None] = "main"
    ends_when_answered: ClassVar[bool] = True
    burst_size: int = 8
    at_s: float = 0.0
    duration_s: float = 600.0

    def __post_init__(self) -> None:
        if self.burst_size < 1 or not 0 <= self.at_s < self.duration_s:
            raise ValueError(f"invalid one-shot burst {self}")

    def users_at(self, time_s: float) -> int | None:
        return 1 if time_s < self.duration_s else None  # the one open-loop user

    def arrival_times(self) -> Iterator[float]:
        return itertools.islice(burst_arrivals(self.at_s, self.duration_s, self.burst_size), self.burst_size)


SHAPES: dict[str, type[LoadPlan]] = {
    "steady": Steady,
    "step-ramp": StepRamp,
    "spike": Spike,
    "poisson": Poisson,
    "long-context-burst": LongContextBurst,
    "one-shot-burst": OneShotBurst,
}


@dataclass(frozen=True)
class ShapeSpec:
    """A shape by name with its parameters: what the runner passes to the Locust process."""

    name: str
    params: dict

    def __post_init__(self) -> None:
        if self.name not in SHAPES:
            raise ValueError(f"unknown shape {self.name!r}; known: {sorted(SHAPES)}")
        known = {f.name for f in fields(SHAPES[self.name])}
        unknown = set(self.params) - known
        if unknown:
            raise ValueError(f"shape {self.name!r} has no parameters {sorted(unknown)}; it has {sorted(known)}")

    def plan(self) -> LoadPlan:
        return SHAPES[self.name](**self.params)

    def to_env(self) -> str:
        return json.dumps({"name": self.name, **self.params})

    @classmethod
    def from_env(cls, value: str) -> ShapeSpec:
        value = value.strip()
        if not value.startswith("{"):
            return cls(name=value, params={})
        data = json.loads(value)
        name = data.pop("name")
        return cls(name=name, params=data)

    def resolved_params(self) -> dict:
        return asdict(self.plan())


def load_test_shape(plan: LoadPlan, is_answered: Callable[[], bool] = lambda: False) -> type:
    """A Locust `LoadTestShape` class that follows `plan` (imports locust: call it in the Locust process).
    `is_answered()`: every arrival of the plan has its answer (the locustfile's open-loop user says); a plan
    that `ends_when_answered` then ends the test at the next tick (Locust ticks once a second)."""
    from locust import LoadTestShape

    def tick(self):
        users = plan.users_at(self.get_run_time())
        if users is None or (plan.ends_when_answered and is_answered()):
            return None
        return users, SPAWN_RATE

    return type(
        f"{type(plan).__name__}Shape",
        (LoadTestShape,),
        {"plan": plan, "tick": tick, "__doc__": type(plan).__doc__, "__module__": __name__},
    )
