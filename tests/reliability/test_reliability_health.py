"""Health that catches stalls: AsyncEngine.check_health fails once one pass of the engine loop has run
longer than stall_timeout_s, and passes while a request merely runs long. (Issue 15, the #61263 case.)
The LLMEngine underneath is a stand-in whose step() the test controls."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from engine.api import EngineDeadError, EngineStats, GenerateRequest, RequestOutput
from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams


@dataclass
class _Telemetry:
    def to_dict(self) -> dict:
        return {}


class _Pool:
    def telemetry(self) -> _Telemetry:
        return _Telemetry()


class SteppedEngine:
    """A request of `num_steps` tokens, one per step(); a step blocks while `hold` is clear."""

    tokenizer = None
    model_config = None
    max_model_len = 64
    model_name = "stepped"
    model_names = ("stepped",)
    supports_migration = False
    max_in_flight = 16
    executor = None

    def __init__(self, stall_timeout_s: float, step_s: float):
        self.config = EngineConfig(stall_timeout_s=stall_timeout_s)
        self.pool = _Pool()
        self.step_s = step_s
        self.hold = threading.Event()
        self.hold.set()
        self._request: GenerateRequest | None = None
        self._left = 0
        self.num_steps = 0

    @property
    def has_work(self) -> bool:
        return self._request is not None

    def validate(self, request) -> None:
        pass

    def add_request(self, request: GenerateRequest) -> None:
        self._request, self._left = request, request.sampling.max_tokens

    def abort(self, request_id):
        self._request = None

    def step(self) -> list[RequestOutput]:
        self.hold.wait()
        time.sleep(self.step_s)
        self.num_steps += 1
        self._left -= 1
        request_id = self._request.request_id
        finished = "length" if self._left == 0 else None
        if finished:
            self._request = None
        return [RequestOutput(request_id, (7,), "x", finished)]

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, 0, 0, 0, 0.0, 0, 0)

    def memory_telemetry(self) -> list[dict]:
        return []

    def close(self) -> None:
        pass


async def _healthy(engine: AsyncEngine) -> bool:
    try:
        await engine.check_health()
    except EngineDeadError:
        return False
    return True


def test_a_long_request_of_short_steps_stays_healthy():
    stepped = SteppedEngine(stall_timeout_s=0.3, step_s=0.02)
    engine = AsyncEngine(stepped)

    async def scenario():
        await engine.start()
        checks = []
        outputs = []

        async def consume():
            request = GenerateRequest("long", (1,), SamplingParams(max_tokens=60))  # 60 steps: ~1.2 s
            async for output in engine.generate(request):
                outputs.append(output)

        task = asyncio.create_task(consume())
        while not task.done():
            checks.append(await _healthy(engine))
            await asyncio.sleep(0.05)
        await task
        await engine.shutdown()
        return checks, outputs

    checks, outputs = asyncio.run(scenario())
    # every token once (stream pacing may merge several steps' tokens into one output)
    assert sum(len(output.new_token_ids) for output in outputs) == 60 and outputs[-1].finish_reason == "length"
    assert len(checks) >= 10 and all(checks)


def test_a_step_stuck_longer_than_the_stall_timeout_fails_health_then_recovers():
    stepped = SteppedEngine(stall_timeout_s=0.3, step_s=0.0)
    engine = AsyncEngine(stepped)

    async def scenario():
        await engine.start()
        stepped.hold.clear()  # the next step hangs (a stuck kernel or collective)
        outputs = []

        async def consume():
            async for output in engine.generate(GenerateRequest("stuck", (1,), SamplingParams(max_tokens=2))):
                outputs.append(output)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        early = await _healthy(engine)
        await asyncio.sleep(0.4)
        with pytest.raises(EngineDeadError, match="has not advanced for 0.[4-9]"):
            await engine.check_health()
        stepped.hold.set()
        await task
        late = await _healthy(engine)
        await engine.shutdown()
        return early, late, outputs

    early, late, outputs = asyncio.run(scenario())
    assert early and late
    # both tokens once, the stream ended by its length (the consumer may read the two steps' outputs as one)
    assert sum(len(output.new_token_ids) for output in outputs) == 2 and outputs[-1].finish_reason == "length"


def test_an_idle_engine_is_healthy_however_long_it_waits():
    engine = AsyncEngine(SteppedEngine(stall_timeout_s=0.1, step_s=0.0))

    async def scenario():
        await engine.start()
        await asyncio.sleep(0.3)
        healthy = await _healthy(engine)
        await engine.shutdown()
        return healthy

    assert asyncio.run(scenario())
