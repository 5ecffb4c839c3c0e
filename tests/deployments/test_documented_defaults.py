"""The defaults docs/CONTRACTS.md documents are the code's: EngineConfig's (engine/config.py) and AppArgs's
(deployments/args.py), field by field, and every field is in its table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from deployments.args import AppArgs, MigrationArgs, ParameterDroppingArgs, PlacementArgs
from engine.config import EngineConfig

CONTRACTS = Path(__file__).resolve().parents[2] / "docs" / "CONTRACTS.md"
ROW = re.compile(r"^\| `(?P<name>\w+)` \| `(?P<default>[^`]+)` \|")


def _documented(header: str) -> dict[str, object]:
    """The rows of the table whose first column is `header`: field name -> evaluated default."""
    lines = CONTRACTS.read_text().splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(f"| {header} |"))
    table = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        match = ROW.match(line)
        assert match, f"unreadable row in {header}: {line}"
        # a Python literal or a tiny expression such as `2 << 30` / `MigrationArgs()`
        table[match["name"]] = eval(match["default"], {"__builtins__": {}, "MigrationArgs": MigrationArgs,
                                                      "PlacementArgs": PlacementArgs,
                                                      "ParameterDroppingArgs": ParameterDroppingArgs})
    return table


def _engine_config_defaults() -> dict[str, object]:
    return {field.name: field.default for field in dataclasses.fields(EngineConfig)}


def _app_args_defaults() -> dict[str, object]:
    return {name: field.get_default(call_default_factory=True) for name, field in AppArgs.model_fields.items()}


def test_engine_config_defaults_match_the_doc():
    assert _documented("EngineConfig field") == _engine_config_defaults()


def test_app_args_defaults_match_the_doc():
    assert _documented("AppArgs field") == _app_args_defaults()


def test_the_parser_reads_what_it_should():
    assert _documented("EngineConfig field")["device_memory_bytes"] == 2 << 30
    assert _documented("AppArgs field")["migration"] == MigrationArgs()
