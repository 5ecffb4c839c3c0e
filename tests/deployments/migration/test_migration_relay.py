"""GenerationRun across a migration, with stub streams: the local stream ends with "migrated", the run goes
on with the relay; a missing relay is an error; a client that leaves cancels the destination's stream."""

from __future__ import annotations

import asyncio

from deployments.ingress.generation import GenerationRun
from deployments.ingress.metrics import ServingMetrics
from deployments.migration.relay import Relay, RelayRegistry
from deployments.migration.source import COMMITTED
from engine.api import GenerateRequest, RequestOutput
from engine.sampling_params import SamplingParams


def out(token: int, finish: str | None = None) -> RequestOutput:
    return RequestOutput("r-0", (token,) if token else (), f"<{token}>" if token else "", finish_reason=finish,
                         num_prompt_tokens=3)


class StubEngine:
    """generate() yields tokens 1, 2, then the 'migrated' end (what the source's engine stream does)."""

    def __init__(self):
        self.aborted = []

    async def generate(self, request):
        for item in (out(1), out(2), out(0, "migrated")):
            yield item

    async def abort(self, request_id):
        self.aborted.append(request_id)


class DestinationStream:
    def __init__(self, outputs, block_after=None):
        self.outputs = outputs
        self.block_after = block_after
        self.closed = False

    async def stream(self):
        try:
            for index, item in enumerate(self.outputs):
                if index == self.block_after:
                    await asyncio.Event().wait()
                yield item
        finally:
            self.closed = True


def run_for(relays: RelayRegistry) -> GenerationRun:
    engine = StubEngine()
    metrics = ServingMetrics(lambda: engine, "m", "source")
    request = GenerateRequest("r-0", (1, 2, 3), SamplingParams(max_tokens=4))
    return GenerationRun(engine, [request], metrics, relays)


def test_the_run_continues_with_the_relay():
    async def scenario():
        relays = RelayRegistry()
        destination = DestinationStream([out(3), out(4, "length")])
        downtimes = []
        relays.put(Relay("r-0", destination.stream(), paused_at=0.0, on_first_token=downtimes.append))
        run = run_for(relays)
        await run.start()
        texts = [output.text_delta async for _, output in run.outputs()]
        await run.close()
        return texts, downtimes, destination.closed, len(relays)

    texts, downtimes, closed, left = asyncio.run(scenario())
    assert texts == ["<1>", "<2>", "<3>", "<4>"]  # "migrated" itself never reaches the client
    assert len(downtimes) == 1 and downtimes[0] >= 0 and closed and left == 0


def test_a_missing_relay_ends_the_request_with_an_error():
    async def scenario():
        run = run_for(RelayRegistry())
        await run.start()
        outputs = [output async for _, output in run.outputs()]
        await run.close()
        return outputs[-1]

    last = asyncio.run(scenario())
    assert last.finish_reason == "error" and "relay" in last.error


def test_a_client_that_leaves_cancels_the_destination():
    async def scenario():
        relays = RelayRegistry()
        destination = DestinationStream([out(3), out(4, "length")], block_after=1)
        relays.put(Relay("r-0", destination.stream(), paused_at=0.0))
        run = run_for(relays)
        await run.start()
        seen = 0
        async for _, output in run.outputs():
            seen += len(output.new_token_ids)
            if seen == 3:
                break  # the client disconnects while the destination is producing
        await run.close()
        return destination.closed, len(relays)

    assert asyncio.run(scenario()) == (True, 0)


def test_dropping_an_untaken_relay_cancels_it():
    """The manager read the destination's "committed" reply, registered the relay, and the client left before
    the HTTP handler took it over."""
    async def scenario():
        relays = RelayRegistry()
        destination = DestinationStream([COMMITTED, out(3)], block_after=1)
        stream = destination.stream()
        assert await anext(stream) == COMMITTED
        relays.put(Relay("r-0", stream, paused_at=0.0))
        await relays.drop("r-0")
        return destination.closed, len(relays)

    assert asyncio.run(scenario()) == (True, 0)


def test_registry_counts_relays_until_they_close():
    async def scenario():
        relays = RelayRegistry()
        relays.put(Relay("r-0", DestinationStream([out(1, "length")]).stream(), paused_at=0.0))
        relays.put(Relay("r-1", DestinationStream([out(1)]).stream(), paused_at=0.0))
        assert relays.num_live == 2
        taken = relays.take("r-0")
        assert relays.num_live == 2  # taken, still relaying
        async for _ in taken.start(None):
            pass
        await relays.drop("r-1")
        return relays.num_live

    assert asyncio.run(scenario()) == 0
