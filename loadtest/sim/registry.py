"""The simulator's commands: one registered function per experiment (`python -m loadtest.sim NAME`).

Adding an experiment is one decorated function in a module listed in `EXPERIMENT_MODULES`:

    @experiment("layerkv", "LayerKV: TTFT and SLO violations with layer-wise KV offloading", add_arguments)
    def run(args: argparse.Namespace) -> int: ...

Seeds whose experiment is not built yet are registered with `not_built` and exit non-zero; registering the
real one replaces the placeholder.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

EXPERIMENT_MODULES = ("loadtest.sim.ellm", "loadtest.sim.mell", "loadtest.sim.layerkv", "loadtest.sim.jenga",
                      "loadtest.sim.kunserve", "loadtest.sim.plan", "loadtest.sim.calibrate",
                      "loadtest.sim.gpu_calibration")


@dataclass(frozen=True)
class Experiment:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    is_placeholder: bool = False


EXPERIMENTS: dict[str, Experiment] = {}


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def experiment(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments):
    """Registers the decorated `run(args) -> exit status` as `python -m loadtest.sim <name>`."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        existing = EXPERIMENTS.get(name)
        if existing is not None and not existing.is_placeholder:
            raise ValueError(f"experiment {name!r} is already registered")
        EXPERIMENTS[name] = Experiment(name, help, add_arguments, run)
        return run

    return register


def not_built(name: str, seed: str) -> None:
    """A placeholder for a seed experiment another issue builds: says so and exits with status 2."""
    if name in EXPERIMENTS:
        return

    def run(args: argparse.Namespace) -> int:
        print(f"{name}: not built yet (the {seed} experiment lands with its own issue; see docs/SIMULATOR.md)")
        return 2

    EXPERIMENTS[name] = Experiment(name, f"{seed}: not built yet", _no_arguments, run, is_placeholder=True)


def load_all() -> dict[str, Experiment]:
    import importlib

    for module in EXPERIMENT_MODULES:
        importlib.import_module(module)
    return EXPERIMENTS
