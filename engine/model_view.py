"""ModelView: the `EngineClient` of one model of an AsyncEngine that runs an EngineGroup.

The group's models share one engine thread (their steps take turns in one pool); a view is what the HTTP
layer gets for a request naming that model: the model's own tokenizer, vocabulary, context limit and stats,
and a `generate` that stamps the model on the request so the group routes it. Start, shutdown, health and
memory telemetry are the shared loop's (one pool). Live migration is not supported for such a replica.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from engine.api import EngineClient, EngineStats, GenerateRequest, RequestOutput

if TYPE_CHECKING:
    from engine.core.engine import LLMEngine

T = TypeVar("T")
NO_MIGRATION = "live migration is not supported on a replica that serves several models from one pool"


class ModelView:
    supports_migration = False

    def __init__(self, loop: EngineClient, engine: LLMEngine):
        """`loop`: the AsyncEngine that steps the group; `engine`: this model's LLMEngine in the group."""
        self._loop = loop
        self._engine = engine
        self.model_name = engine.model_name
        self.model_names = loop.model_names
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len

    async def start(self) -> None:
        await self._loop.start()

    async def shutdown(self) -> None:
        await self._loop.shutdown()

    async def check_health(self) -> None:
        await self._loop.check_health()

    def for_model(self, name: str) -> EngineClient:
        return self._loop.for_model(name)

    async def generate(self, request: GenerateRequest) -> AsyncIterator[RequestOutput]:
        async for output in self._loop.generate(replace(request, model=self.model_name)):
            yield output

    async def abort(self, request_id: str) -> None:
        await self._loop.abort(request_id)

    def stats(self) -> EngineStats:
        """This model's own stats from the loop's last snapshot (the pool's free KV is shared)."""
        snapshot = self._loop.stats()
        return dict(snapshot.per_model).get(self.model_name, snapshot)

    def memory_telemetry(self) -> list[dict]:
        return self._loop.memory_telemetry()

    def max_tokens_that_fit(self, num_prompt_tokens: int) -> int:
        return self._engine.max_tokens_that_fit(num_prompt_tokens)  # pure: reads immutable sizes only

    async def run_in_engine(self, function: Callable[..., T], *args: object) -> T:
        raise RuntimeError(NO_MIGRATION)

    async def stream_attached(self, request_id: str, attach: Callable[..., object],
                              *args: object) -> AsyncIterator[RequestOutput]:
        raise RuntimeError(NO_MIGRATION)
        yield  # an async generator, like AsyncEngine's

    def end_stream(self, request_id: str, output: RequestOutput) -> None:
        raise RuntimeError(NO_MIGRATION)
