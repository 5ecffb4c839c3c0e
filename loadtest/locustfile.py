"""Locust users for OpenAI-compatible streaming servers (ours, vLLM, ...).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000                 # web UI
    locust -f loadtest/locustfile.py --host URL --headless -u 8 -r 8 -t 60s CompletionsUser

`python -m loadtest.run` drives this file with the variables below; by hand, all are optional:
  LOADTEST_WORKLOAD        workload JSON written by the runner (default: 128-in/128-out prompts made here,
                           lengths from word counts, plus long prompts for a long-context burst)
  LOADTEST_REQUESTS_FILE   append one JSON line per finished request here (exact numbers for the summary)
  LOADTEST_SHAPE           a shape from loadtest/shapes.py, e.g. `spike` or '{"name": "poisson", "rate_per_s": 4}'
                           (default: none; -u/-r/-t or the web UI set the user count)
  LOADTEST_MODEL           model id (default: the first one GET /v1/models lists)
  LOADTEST_ENDPOINT        endpoint of the open-loop user: completions | chat (default completions)
  LOADTEST_FORCE_OUTPUT_LENGTH  0 to not send ignore_eos/min_tokens (servers that reject unknown fields)
  LOADTEST_READ_TIMEOUT_S  longest wait for the next bytes of a response (default 600)
  LOADTEST_MAX_IN_FLIGHT   open loop: arrivals beyond this many running requests fail at once (default 512)

Besides Locust's usual row for the HTTP request (its time is time-to-headers, since the body streams), each
request fires custom events, one row each in Locust's tables: TTFT (size column: prompt tokens), ITL (one
per gap between text chunks), TPOT and E2E (size column: output tokens). The request's JSON line holds the
exact times; the summary is computed from those.
"""

# Locust first: importing it monkey-patches the standard library for gevent, which must happen before
# anything else creates sockets or threads (and torch or ray must never be imported in this process).
from locust import HttpUser, constant, events, task  # isort: skip
from locust.exception import StopUser  # isort: skip
from locust.runners import STATE_RUNNING, STATE_SPAWNING  # isort: skip

import itertools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.lock
import gevent.pool
from requests.adapters import HTTPAdapter

# `locust -f loadtest/locustfile.py` imports this file by path: make the package importable from the repo root
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import shapes  # noqa: E402
from loadtest.metrics import RequestRecord  # noqa: E402
from loadtest.openai_stream import ENDPOINT_PATHS, RequestOptions, StreamTimer, request_body  # noqa: E402
from loadtest.tokens import WordTokenCounter  # noqa: E402
from loadtest.workloads import FixedLengths, LongContext, PoolSpec, Session, Turn, Workload, generate  # noqa: E402

logger = logging.getLogger("loadtest")

READ_TIMEOUT_S = float(os.environ.get("LOADTEST_READ_TIMEOUT_S", "600"))
MAX_IN_FLIGHT = int(os.environ.get("LOADTEST_MAX_IN_FLIGHT", "512"))
OPEN_LOOP_ENDPOINT = os.environ.get("LOADTEST_ENDPOINT", "completions")
IS_FORCING_OUTPUT_LENGTH = os.environ.get("LOADTEST_FORCE_OUTPUT_LENGTH", "1") != "0"

_SHAPE_SPEC = shapes.ShapeSpec.from_env(os.environ["LOADTEST_SHAPE"]) if os.environ.get("LOADTEST_SHAPE") else None
_PLAN = _SHAPE_SPEC.plan() if _SHAPE_SPEC else None
if _PLAN is not None:
    # Locust uses the LoadTestShape subclass it finds in this module; there is exactly one, or none. A
    # one-shot plan ends the test once the open-loop user has every answer (RUN is made below).
    LoadShape = shapes.load_test_shape(_PLAN, is_answered=lambda: RUN.is_schedule_answered)


def _load_workload() -> Workload:
    path = os.environ.get("LOADTEST_WORKLOAD")
    if path:
        return Workload.load(path)
    # No runner: make a small default here. Word counts only; a tokenizer could import torch.
    pools = {"main": PoolSpec(FixedLengths(128, 128), num_sessions=2000)}
    if _PLAN is not None and _PLAN.open_loop_pool == "burst":
        pools["burst"] = PoolSpec(LongContext(context_tokens=4096), num_sessions=64)
    return generate("default", pools, WordTokenCounter(), seed=0)


class _Run:
    """State shared by all users of this process (greenlets: no locks needed except around I/O)."""

    def __init__(self) -> None:
        self.workload = _load_workload()
        self._cursors = {pool: itertools.count() for pool in self.workload.pools}
        self._has_wrapped: set[str] = set()
        self.model: str | None = os.environ.get("LOADTEST_MODEL") or None
        self._model_lock = gevent.lock.Semaphore()
        # the open-loop schedule and the perf_counter() time it counts from (when the open-loop user began)
        self.arrivals: Iterator[float] | None = None
        self.arrivals_origin = 0.0
        self.is_schedule_answered = False  # the schedule is over and every request it sent has its answer
        path = os.environ.get("LOADTEST_REQUESTS_FILE")
        self._records = open(path, "a", encoding="utf-8", buffering=1) if path else None

    def next_session(self, pool: str) -> Session:
        sessions = self.workload.pools[pool]
        index = next(self._cursors[pool])
        if index >= len(sessions) and pool not in self._has_wrapped:
            self._has_wrapped.add(pool)
            logger.warning("workload pool %r used up after %d sessions; repeating prompts now", pool, len(sessions))
        return sessions[index % len(sessions)]

    def resolve_model(self, client) -> str:
        with self._model_lock:
            for attempt in range(5):
                if self.model is not None:
                    break
                response = client.get("/v1/models", name="/v1/models")
                try:
                    self.model = response.json()["data"][0]["id"]
                except Exception:
                    logger.warning("GET /v1/models failed (status %s); retrying", response.status_code)
                    gevent.sleep(min(2**attempt, 5))
            if self.model is None:
                raise RuntimeError("no model: GET /v1/models failed; set LOADTEST_MODEL")
            return self.model

    def write(self, record: RequestRecord) -> None:
        if self._records is not None:
            self._records.write(record.to_json() + "\n")


RUN = _Run()


@events.test_start.add_listener
def _on_test_start(environment, **_kwargs) -> None:
    RUN.arrivals = None  # a new test in the web UI starts its arrival schedule over
    RUN.is_schedule_answered = False


class LlmUser(HttpUser):
    """Sends workload sessions, turn after turn, and times each streamed answer."""

    abstract = True
    host = os.environ.get("LOADTEST_HOST", "http://127.0.0.1:8000")
    wait_time = constant(0)  # closed loop: the next request goes out when the last one finished
    endpoint = "completions"

    def on_start(self) -> None:
        self.options = RequestOptions(
            model=RUN.resolve_model(self.client), is_forcing_output_length=IS_FORCING_OUTPUT_LENGTH
        )

    def run_session(self, session: Session, pool: str) -> None:
        for index, turn in enumerate(session.turns):
            record = self.send(turn, pool=pool, session_id=session.session_id, turn_index=index)
            if not record.is_ok:
                break  # later turns build on this one

    def send(self, turn: Turn, pool: str, session_id: str, turn_index: int) -> RequestRecord:
        path = ENDPOINT_PATHS[self.endpoint]
        name = self.endpoint if pool == "main" else f"{self.endpoint} [{pool}]"
        body = request_body(self.endpoint, turn.prompt, turn.chat_messages(), turn.max_tokens, self.options)
        timer = StreamTimer(
            request_id=uuid.uuid4().hex[:16],
            endpoint=self.endpoint,
            start_time=time.time(),
            num_requested_output_tokens=turn.max_tokens,
            pool=pool,
            session_id=session_id,
            turn=turn_index,
        )
        headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity"}  # compression would buffer
        started = time.perf_counter()
        error = None
        with self.client.post(
            path, json=body, stream=True, catch_response=True, name=path, headers=headers, timeout=(30, READ_TIMEOUT_S)
        ) as response:
            status = response.status_code
            try:
                if not status:
                    error = f"connection failed: {getattr(response, 'error', None)}"
                elif status != 200:
                    error = f"HTTP {status}: {_error_message(response)}"
                else:
                    previous = None
                    # chunk_size=None yields each HTTP chunk as it arrives (a size would wait to fill it)
                    for data in response.iter_content(chunk_size=None):
                        for arrival in timer.feed(data, time.perf_counter() - started):
                            if previous is not None:
                                self._fire("ITL", name, arrival - previous)
                            previous = arrival
            except Exception as failure:  # a broken stream; GreenletExit (test stopping) is not an Exception
                error = f"{type(failure).__name__}: {failure}"
            record = timer.finish(time.perf_counter() - started, error=error, status_code=status)
            if record.is_ok:
                response.success()
            else:
                response.failure(record.error)
        self._report(record, name)
        return record

    def _report(self, record: RequestRecord, name: str) -> None:
        RUN.write(record)
        if not record.is_ok:
            self._fire("E2E", name, record.e2e_s, exception=RuntimeError(record.error))
            return
        if record.ttft_s is not None:
            self._fire("TTFT", name, record.ttft_s, length=record.num_prompt_tokens or 0)
        if record.tpot_s is not None:
            self._fire("TPOT", name, record.tpot_s, length=record.num_output_tokens)
        self._fire("E2E", name, record.e2e_s, length=record.num_output_tokens)

    def _fire(self, kind: str, name: str, seconds: float, length: int = 0, exception=None) -> None:
        self.environment.events.request.fire(
            request_type=kind,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=exception,
            context={},
            response=None,
            start_time=time.time(),
            url=None,
        )


def _error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])[:300]
    except Exception:
        return (response.text or "")[:300]


class CompletionsUser(LlmUser):
    """Closed loop on /v1/completions."""

    endpoint = "completions"

    @task
    def next_session(self) -> None:
        self.run_session(RUN.next_session("main"), pool="main")


class ChatUser(LlmUser):
    """Closed loop on /v1/chat/completions."""

    endpoint = "chat"

    @task
    def next_session(self) -> None:
        self.run_session(RUN.next_session("main"), pool="main")


class OpenLoopUser(LlmUser):
    """Fires the shape's arrival schedule (Poisson, bursts) without waiting for answers.

    One such user per test; each arrival runs in its own greenlet. Only present when LOADTEST_SHAPE names an
    open-loop shape.
    """

    abstract = _PLAN is None or _PLAN.open_loop_pool is None
    fixed_count = 1
    endpoint = OPEN_LOOP_ENDPOINT

    def on_start(self) -> None:
        super().on_start()
        # one connection per request in flight, kept for reuse (requests' default keeps 10)
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=MAX_IN_FLIGHT)
        self.client.mount("http://", adapter)
        self.client.mount("https://", adapter)

    @task
    def fire_arrivals(self) -> None:
        pool_name = _PLAN.open_loop_pool
        if RUN.arrivals is None:  # shared, so a respawned user continues the schedule instead of replaying it
            RUN.arrivals = iter(_PLAN.arrival_times())
            # counted from now, not from the shape's start: the user starts a moment later, and arrivals due
            # in that moment would otherwise all go out at once
            RUN.arrivals_origin = time.perf_counter()
        in_flight = gevent.pool.Pool()
        try:
            for at in RUN.arrivals:
                delay = at - (time.perf_counter() - RUN.arrivals_origin)
                if delay > 0:
                    gevent.sleep(delay)
                if not self._is_test_running():
                    break
                session = RUN.next_session(pool_name)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    self._drop(session, pool_name)
                    continue
                in_flight.spawn(self.run_session, session, pool_name)
            in_flight.join()
            RUN.is_schedule_answered = True  # a one-shot shape ends the test at its next tick
        finally:
            in_flight.kill(block=False)
        # The schedule is done. Idle rather than return (Locust would run the task again) until the test stops.
        while self._is_test_running():
            gevent.sleep(0.2)
        raise StopUser()

    def _is_test_running(self) -> bool:
        return self.environment.runner is None or self.environment.runner.state in (STATE_RUNNING, STATE_SPAWNING)

    def _drop(self, session: Session, pool: str) -> None:
        timer = StreamTimer(
            uuid.uuid4().hex[:16], self.endpoint, time.time(), session.turns[0].max_tokens, pool, session.session_id
        )
        record = timer.finish(0.0, error=f"not sent: {MAX_IN_FLIGHT} requests already in flight", status_code=None)
        self._report(record, self.endpoint if pool == "main" else f"{self.endpoint} [{pool}]")


if __name__ == "__main__":  # `python loadtest/locustfile.py` prints what it would send
    print(json.dumps(RUN.workload.stats(), indent=2))
