"""A debug audit of the KV cache's invariants on the engine thread (EngineConfig.check_kv_invariants).

AsyncEngine records each event of its loop (a request added or aborted, an engine call such as a migration's
reserve or cancel, a step and the requests it touched) and, after each, checks memory/kv/invariants.py. The
first violation raises KVInvariantError whose message holds the violations and the last events, the trail that
led there (a bug seen once in a served run is then found from its log, not re-derived)."""

from __future__ import annotations

from collections import deque

from memory.kv.invariants import mapping_violations


class KVInvariantError(RuntimeError):
    """The KV cache's mappings no longer match its requests' blocks."""


class KVAudit:
    def __init__(self, kv, history: int = 64):
        self.kv = kv
        self.events: deque[str] = deque(maxlen=history)
        self.num_checks = 0

    def after(self, event: str) -> None:
        """Records `event` (what just ran on the engine thread) with the slot table it left, then checks."""
        self.events.append(f"{event} -> slots {list(self.kv.slots.requests)}")
        self.num_checks += 1
        violations = mapping_violations(self.kv)
        if violations:
            trail = "\n  ".join(self.events)
            raise KVInvariantError("KV mappings broken after the last event:\n  " + "\n  ".join(violations)
                                   + f"\nlast {len(self.events)} events:\n  {trail}")


def describe_call(function, args) -> str:
    """A short name for an engine call: the function and its plain arguments (request ids, token counts)."""
    name = getattr(function, "__qualname__", repr(function))
    plain = [repr(arg) for arg in args if isinstance(arg, (str, int, float))]
    return f"call {name}({', '.join(plain)})"
