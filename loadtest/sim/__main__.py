"""`python -m loadtest.sim ellm | mell | layerkv | jenga | kunserve | plan | calibrate` (loadtest/sim/registry.py)."""

from __future__ import annotations

import argparse
import sys

from loadtest.sim.registry import load_all


def main(argv: list[str] | None = None) -> int:
    experiments = load_all()
    parser = argparse.ArgumentParser(prog="python -m loadtest.sim",
                                     description="GPU-scale simulator: the real scheduler, KV manager, pool and "
                                                 "cluster policies on a cost model (docs/SIMULATOR.md)")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, entry in experiments.items():
        entry.add_arguments(commands.add_parser(name, help=entry.help, description=entry.help))
    args = parser.parse_args(argv)
    return experiments[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
