"""Thread priorities of a Ray worker process (the cluster controller, Serve's proxy).

Ray starts its workers at nice 15 (`RAY_worker_niceness`) and a replica's engine loop takes nice -10
(EngineConfig.engine_thread_nice), so while the compute threads fill the cores any other worker waits:
`take_priority` lifts every thread of the calling process (Ray's RPC threads included; threads started later
inherit their creator's value). Lowering a nice value needs CAP_SYS_NICE; without it nothing changes.
"""

from __future__ import annotations

import os


def take_priority(nice: int, tasks: str = "/proc/self/task") -> int:
    """Sets every thread of this process to `nice`; returns how many took it (0: none, e.g. no CAP_SYS_NICE)."""
    changed = 0
    try:
        thread_ids = [int(name) for name in os.listdir(tasks)]
    except OSError:
        return 0
    for thread_id in thread_ids:
        try:
            os.setpriority(os.PRIO_PROCESS, thread_id, nice)
            changed += 1
        except OSError:  # no CAP_SYS_NICE, or the thread ended
            pass
    return changed
