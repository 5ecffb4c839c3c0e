"""Several engines on one device, taking turns: the step loop of a `SharedDevice` (loadtest/sim/replica.py),
Jenga's multi-model pool.

The device runs one step at a time; the engines (`SimReplica` lanes, one per model, each with its own
Scheduler and KV manager over the shared pool) take turns, round robin: in a round, each lane with work
plans its next step at the end of the previous lane's, so a lane's schedule() sees what the steps before
it freed or took. Fast-forward (replica.py: a decode-only batch repeated without calling schedule()) stays
exact with several lanes under these rules:
- a lane whose plan is one step (a prefill, a preemption, a request finishing or a page sliding out)
  completes before the next lane plans, and every multi-step run of that round keeps only its first step
  (a multi-step run's first step frees nothing and takes nothing after its plan, so the lanes after it
  may plan before it completes);
- when every lane that stepped has a multi-step run, they run R = (shortest run - 1) rounds interleaved:
  none of those steps changes the pool (the last step of a run is where it may free a page or finish a
  request, so it is left to the next round, where the other lanes plan after it);
- a lane alone (no other lane stepped in the round) keeps its whole run, as a single replica does.
`observe(seconds)` is called with the device time the state it sees lasts (for time-weighted averages).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from loadtest.sim.replica import SimReplica


class DeviceLoop:
    def __init__(self, lanes: Sequence[SimReplica], observe: Callable[[float], None] | None = None):
        self.lanes = tuple(lanes)
        self.observe = observe or (lambda seconds: None)
        self.num_rounds = 0

    def has_work(self) -> bool:
        return any(lane.engine.scheduler.has_work for lane in self.lanes)

    def run(self, now: float = 0.0) -> float:
        """Rounds until no lane has work; returns when the last step ends."""
        while self.has_work():
            now = self.round(now)
        return now

    def round(self, now: float) -> float:
        """One turn of every lane with work; returns when the round's last step ends."""
        self.num_rounds += 1
        clock, single = now, False
        multi: list[tuple[SimReplica, np.ndarray, float]] = []  # lane, its step times, when its first step starts
        for lane in self.lanes:
            if not lane.engine.scheduler.has_work:
                continue
            end = lane.start(clock)
            if end is None:
                continue
            times = lane.step_times()
            if len(times) == 1:
                self.observe(float(times[0]))
                lane.complete()
                clock, single = end, True
            else:
                multi.append((lane, times, clock))
                clock += float(times[0])
        if not multi:
            if clock == now:
                raise AssertionError("requests are left but no engine on the device can take a step")
            return clock
        if len(multi) == 1 and not single:  # alone on the device: its whole run, as a lone replica
            lane, times, start = multi[0]
            self.observe(float(times.sum()))
            lane.complete()
            return start + float(times.sum())
        rounds = 1 if single else max(1, min(len(times) for _, times, _ in multi) - 1)
        ends: dict[int, list[float]] = {index: [] for index in range(len(multi))}
        if single:  # each keeps its first step, where phase one placed it
            for index, (_, times, start) in enumerate(multi):
                ends[index].append(start + float(times[0]))
        else:
            clock = now
            for step in range(rounds):
                for index, (_, times, _) in enumerate(multi):
                    clock += float(times[step])
                    ends[index].append(clock)
        self.observe(sum(float(times[:rounds].sum()) for _, times, _ in multi))
        for index, (lane, _, _) in enumerate(multi):
            lane.retime(ends[index])
            lane.complete()
        return max(clock, max(ends[index][-1] for index in ends))
