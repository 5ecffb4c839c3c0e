"""Noticing a peer of a cross-process pair that hangs: alive, its sockets open, but not answering (stopped,
stuck in a long stall, or on a host that vanished without closing its connections). A process that dies
closes its sockets and the pair's group fails at once; a hung one would be noticed only at the group's
timeout (30 s in Serve).

Each side runs a `Heartbeat`: every `interval_s` one thread adds 1 to its own counter in a store (the
pair's TCPStore, through a client of its own) and reads the peer's; another judges. A peer whose counter
has not moved for `hang_after_s`, by this side's monotonic clock, is hung (a store call that blocks or
fails counts as no beat: the leader hosts the store, so a hung leader stops answering it too). The judge
then calls `on_hang(seconds)` once and both stop, so a peer that resumes later notices this side gone the
same way. The beats come from a thread of their own, not from the engine loop,
so a long step never looks like a hang; a process whose engine thread alone is stuck while its other
threads run is not detected here (the group's timeout still bounds that case).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Heartbeat:
    def __init__(self, store, rank: int, on_hang: Callable[[float], None], interval_s: float = 0.25,
                 hang_after_s: float = 3.0):
        """`store`: a torch.distributed Store client used by this heartbeat alone."""
        if not 0 < interval_s < hang_after_s:
            raise ValueError("a heartbeat needs 0 < interval_s < hang_after_s")
        self.store = store
        self.interval_s = interval_s
        self.hang_after_s = hang_after_s
        self._mine, self._theirs = f"beat/{rank}", f"beat/{1 - rank}"
        self._on_hang = on_hang
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_value: int | None = None
        self._last_seen = time.monotonic()
        self.hung_for: float | None = None  # set once the peer is judged hung: seconds without a beat
        # the store calls may block (a hung leader hosts the store): they get a thread of their own, which is
        # never waited for; the judge only reads the time of the last beat seen
        threading.Thread(target=self._beat, name=f"pair-heartbeat-{rank}", daemon=True).start()
        self._judge_thread = threading.Thread(target=self._judge, name=f"pair-heartbeat-judge-{rank}", daemon=True)
        self._judge_thread.start()

    def _beat(self) -> None:
        while not self._stop.is_set():
            try:
                self.store.add(self._mine, 1)
                value = self.store.add(self._theirs, 0)
            except Exception:  # noqa: BLE001 - a store that fails or times out: no beat this round
                value = self._last_value
            if value != self._last_value:
                self._last_value, self._last_seen = value, time.monotonic()
            self._stop.wait(self.interval_s)

    def _judge(self) -> None:
        while not self._stop.wait(self.interval_s):
            silent = time.monotonic() - self._last_seen
            if silent > self.hang_after_s:
                with self._lock:
                    if self._stop.is_set():
                        return
                    self._stop.set()
                    self.hung_for = silent
                self._on_hang(silent)
                return

    def stop(self) -> None:
        """Stops beating and watching (the pair ended); no `on_hang` after this returns."""
        with self._lock:
            self._stop.set()
        if self._judge_thread is not threading.current_thread():
            self._judge_thread.join()
