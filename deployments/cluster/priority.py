"""Thread priorities of Ray worker processes (the cluster controller, Serve's proxies).

Ray starts its workers at nice 15 (`RAY_worker_niceness`) and a replica's engine loop takes nice -10
(EngineConfig.engine_thread_nice), so while the compute threads fill the cores any other worker waits. Two
of them must not: the cluster controller (a spike's report and the drop order it brings) and the node's
HTTP proxy (requests reach the replicas only through it). `take_priority` lifts every thread of the calling
process; `lift_processes` those of this node's processes with a given title (Ray titles its workers
`ray::<class>`). Threads started later inherit their creator's value. Lowering a nice value needs
CAP_SYS_NICE; without it nothing changes (both return 0).
"""

from __future__ import annotations

import os
from pathlib import Path

PROXY_TITLE = "ray::ProxyActor"


def _set_threads(tasks: Path, nice: int) -> int:
    try:
        thread_ids = [int(name) for name in os.listdir(tasks)]
    except (OSError, ValueError):
        return 0
    changed = 0
    for thread_id in thread_ids:
        try:
            os.setpriority(os.PRIO_PROCESS, thread_id, nice)
            changed += 1
        except OSError:  # no CAP_SYS_NICE, or the thread ended
            pass
    return changed


def take_priority(nice: int, tasks: str = "/proc/self/task") -> int:
    """Sets every thread of this process to `nice`; returns how many took it."""
    return _set_threads(Path(tasks), nice)


def lift_processes(title: str, nice: int, proc: str = "/proc") -> int:
    """Sets every thread of this node's processes titled `title` (their command line's first word; Ray adds
    `.<method>` while one runs) to `nice` where that raises them (never lowers one already above it); returns
    how many threads took it."""
    changed = 0
    for entry in Path(proc).iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
            current = os.getpriority(os.PRIO_PROCESS, int(entry.name))
        except (OSError, ValueError):
            continue
        if (command == title or command.startswith(title + ".")) and current > nice:
            changed += _set_threads(entry / "task", nice)
    return changed
