"""Load shapes as pure functions of time. (Their Locust wrapper imports locust, which monkey-patches the
process with gevent, so it is exercised only in the smoke tests' Locust subprocess.)"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from loadtest.scenarios import SCENARIOS, RunSettings
from loadtest.shapes import (
    SHAPES,
    LongContextBurst,
    OneShotBurst,
    Poisson,
    ShapeSpec,
    Spike,
    Steady,
    StepRamp,
    burst_arrivals,
    poisson_arrivals,
)


def test_the_runner_never_imports_locust():
    # locust monkey-patches the process with gevent on import; the runner (which may load torch for the
    # tokenizer) must leave that to its Locust subprocess
    code = "import sys, loadtest.run, loadtest.compare, loadtest.shapes; sys.exit('locust' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_steady():
    plan = Steady(users=8, duration_s=10)
    assert [plan.users_at(t) for t in (0, 5, 9.99, 10)] == [8, 8, 8, None]
    assert list(plan.arrival_times()) == [] and plan.open_loop_pool is None


def test_step_ramp():
    plan = StepRamp(start_users=2, step_users=3, step_s=5, max_users=9, duration_s=30)
    assert [plan.users_at(t) for t in (0, 4.9, 5, 10, 15, 20, 29.9, 30)] == [2, 2, 5, 8, 9, 9, 9, None]


def test_spike():
    plan = Spike(base_users=4, multiple=2.5, spike_start_s=10, spike_s=5, duration_s=20)
    assert [plan.users_at(t) for t in (0, 9.9, 10, 14.9, 15, 19.9, 20)] == [4, 4, 10, 10, 4, 4, None]


def test_poisson_arrivals_are_seeded_and_have_the_right_rate():
    first = list(itertools.islice(poisson_arrivals(4.0, seed=1), 4000))
    assert first == list(itertools.islice(poisson_arrivals(4.0, seed=1), 4000))
    assert first != list(itertools.islice(poisson_arrivals(4.0, seed=2), 4000))
    assert all(later >= earlier for earlier, later in zip(first, first[1:], strict=False))
    assert 4000 / first[-1] == pytest.approx(4.0, rel=0.05)
    plan = Poisson(rate_per_s=4.0, duration_s=10, seed=1)
    arrivals = list(plan.arrival_times())
    assert arrivals == [t for t in first if t < 10]
    assert plan.users_at(0) == 1 and plan.users_at(10) is None and plan.open_loop_pool == "main"


def test_long_context_bursts():
    assert list(itertools.islice(burst_arrivals(2.0, 5.0, 3), 7)) == [2.0, 2.0, 2.0, 7.0, 7.0, 7.0, 12.0]
    plan = LongContextBurst(base_users=3, burst_size=2, first_burst_s=5, period_s=10, duration_s=30)
    assert list(plan.arrival_times()) == [5.0, 5.0, 15.0, 15.0, 25.0, 25.0]
    assert plan.users_at(0) == 4 and plan.users_at(30) is None  # 3 closed-loop users + the open-loop one
    assert plan.open_loop_pool == "burst"


def test_one_shot_burst_sends_every_request_at_once_and_ends_when_they_are_answered():
    plan = OneShotBurst(burst_size=8, duration_s=600)
    assert list(plan.arrival_times()) == [0.0] * 8 and list(plan.arrival_times()) == [0.0] * 8  # once, repeatable
    assert plan.users_at(0) == 1 and plan.users_at(599.9) == 1 and plan.users_at(600) is None  # or at the duration
    assert plan.open_loop_pool == "main" and plan.ends_when_answered
    assert list(OneShotBurst(burst_size=3, at_s=2.5, duration_s=10).arrival_times()) == [2.5] * 3
    assert not any(shape.ends_when_answered for name, shape in SHAPES.items() if name != "one-shot-burst")


def test_layerkv_burst_plans_n_prompts_of_p_tokens_with_fixed_outputs():
    plan = SCENARIOS["layerkv-burst"].build(RunSettings(duration_s=900))
    shape = plan.shape.plan()
    assert isinstance(shape, OneShotBurst) and shape.burst_size == 8 and shape.duration_s == 900
    assert plan.user_classes == ("OpenLoopUser",) and plan.endpoint == "completions"
    lengths = plan.pools["main"].distribution
    assert plan.pools["main"].num_sessions == 8
    assert (lengths.num_prompt_tokens, lengths.num_output_tokens) == (256, 768)
    settings = RunSettings(duration_s=60, burst_size=3, prompt_tokens=32, output_tokens=16)
    smaller = SCENARIOS["layerkv-burst"].build(settings)
    lengths = smaller.pools["main"].distribution
    assert list(smaller.shape.plan().arrival_times()) == [0.0] * 3 and smaller.pools["main"].num_sessions == 3
    assert (lengths.num_prompt_tokens, lengths.num_output_tokens) == (32, 16)
    with pytest.raises(ValueError):
        RunSettings(burst_size=0)


def test_validation():
    with pytest.raises(ValueError):
        Steady(users=0)
    with pytest.raises(ValueError):
        Spike(multiple=0.5)
    with pytest.raises(ValueError):
        Poisson(rate_per_s=0)
    with pytest.raises(ValueError):
        StepRamp(start_users=5, max_users=4)
    with pytest.raises(ValueError):
        LongContextBurst(burst_size=0)
    with pytest.raises(ValueError):
        OneShotBurst(burst_size=0)
    with pytest.raises(ValueError):
        OneShotBurst(at_s=10, duration_s=10)


def test_shape_spec_round_trips_through_the_environment():
    spec = ShapeSpec("spike", {"base_users": 2, "duration_s": 30.0})
    assert ShapeSpec.from_env(spec.to_env()) == spec
    assert json.loads(spec.to_env()) == {"name": "spike", "base_users": 2, "duration_s": 30.0}
    assert ShapeSpec.from_env("steady").plan() == Steady()
    assert spec.resolved_params() == {
        "base_users": 2,
        "multiple": 4.0,
        "spike_start_s": 20.0,
        "spike_s": 20.0,
        "duration_s": 30.0,
    }
    with pytest.raises(ValueError, match="unknown shape"):
        ShapeSpec("sawtooth", {})
    with pytest.raises(ValueError, match="no parameters"):
        ShapeSpec("steady", {"rate_per_s": 1})


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_every_scenario_builds_a_consistent_plan(name):
    plan = SCENARIOS[name].build(RunSettings(duration_s=30, context_tokens=1024))
    assert plan.shape.name in SHAPES
    shape = plan.shape.plan()
    assert shape.users_at(29.9) is not None and shape.users_at(30) is None
    assert set(plan.user_classes) <= {"CompletionsUser", "ChatUser", "OpenLoopUser"}
    assert ("OpenLoopUser" in plan.user_classes) == (shape.open_loop_pool is not None)
    if shape.open_loop_pool is not None:
        assert shape.open_loop_pool in plan.pools
        assert plan.pools[shape.open_loop_pool].num_sessions >= len(list(shape.arrival_times()))
    assert "main" in plan.pools


def test_settings_override_scenario_defaults():
    plan = SCENARIOS["steady-32"].build(RunSettings(duration_s=5, users=3, prompt_tokens=16, output_tokens=8))
    assert plan.shape.params == {"users": 3, "duration_s": 5}
    assert (plan.pools["main"].distribution.num_prompt_tokens, plan.pools["main"].distribution.num_output_tokens) == (
        16,
        8,
    )
    poisson = SCENARIOS["poisson"].build(RunSettings(duration_s=5, rate_per_s=7.5))
    assert poisson.shape.params["rate_per_s"] == 7.5
    burst = SCENARIOS["long-context"].build(RunSettings(duration_s=30, context_tokens=2048))
    assert burst.pools["burst"].distribution.context_tokens == 2048
