"""The two generation endpoints: request -> engine requests -> OpenAI response or SSE stream.

Everything that can be rejected (model name, prompt length, sampling values, queue full) is checked
before the response starts, so it gets a real HTTP status; what fails later is sent as one SSE error
event followed by `[DONE]`. Every path that started engine requests ends in `GenerationRun.close()`, which
aborts what is still running (client gone, server error, shutdown). A request the server ends itself
(finish_reason "abort" while the client is still there: drain, shutdown) is a retryable 503 `aborted`.

Tokenising runs in a small thread pool, never on the event loop: a 4 MB prompt takes seconds in the
tokenizer, and health checks and other requests must not wait for it (the fast tokenizers release the GIL).
Prompts longer than the context can possibly hold are refused from their length alone, before tokenising.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi.responses import JSONResponse, StreamingResponse

from deployments.ingress import errors
from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.generation import GenerationRun
from deployments.ingress.metrics import ServingMetrics
from deployments.ingress.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    SamplingKwargs,
    TopLogprob,
    UsageInfo,
    new_id,
    now_s,
)
from deployments.ingress.validation import check_prompt_chars, prompt_char_limit
from deployments.migration.relay import RelayRegistry
from engine.api import EngineClient, GenerateRequest, RequestOutput, TokenLogprob

logger = logging.getLogger(__name__)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(payload: str) -> str:
    return f"data: {payload}\n\n"


class _RunStreamingResponse(StreamingResponse):
    """Closes the run even if the body iterator never started (client gone before the first byte)."""

    def __init__(self, content: AsyncIterator[str], run: GenerationRun):
        super().__init__(content, media_type="text/event-stream", headers=SSE_HEADERS)
        self._run = run

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._run.close()


class OpenAIServing:
    def __init__(self, engine_provider: Callable[[], EngineClient | None],
                 bindings_provider: Callable[[], EngineBindings], metrics: ServingMetrics,
                 served_models: Callable[[], dict[str, str]],
                 default_sampling: SamplingKwargs | None = None, relays: RelayRegistry | None = None):
        self._default_sampling = dict(default_sampling or {})
        self._relays = relays
        self._engine_provider = engine_provider
        self._bindings_provider = bindings_provider
        self._metrics = metrics
        self._served_models = served_models  # the name clients send -> the engine's model name; default first
        self._text_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="elastic-text")
        self._token_chars: dict[int, int] = {}  # id(tokenizer) -> its longest vocabulary entry
        self._runs: set[GenerationRun] = set()
        self.is_draining = False

    # ---- shared ---------------------------------------------------------------------------------

    def engine(self) -> EngineClient:
        engine = self._engine_provider()
        if engine is None:
            raise errors.overloaded("The model is still loading.", retry_after_s=5)
        return engine

    @property
    def num_runs(self) -> int:
        """HTTP requests with engine requests in flight."""
        return len(self._runs)

    async def abort_all(self) -> None:
        """Ends every run now (shutdown): each client gets a 503 `aborted`, or in a stream an error event
        and `[DONE]`."""
        for run in list(self._runs):
            await run.abort()

    def close(self) -> None:
        self._text_pool.shutdown(wait=False, cancel_futures=True)

    async def _off_loop(self, function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._text_pool, function, *args)

    async def _char_limit(self, engine: Any) -> int:
        tokenizer = engine.tokenizer
        if id(tokenizer) not in self._token_chars:
            longest = await self._off_loop(self._bindings_provider().longest_token_chars, tokenizer)
            self._token_chars[id(tokenizer)] = longest
        return prompt_char_limit(engine.max_model_len, self._token_chars[id(tokenizer)])

    async def _encode_prompt(self, engine: Any, text: str) -> list[int]:
        check_prompt_chars(len(text), await self._char_limit(engine), engine.max_model_len, "prompt")
        return list(await self._off_loop(self._bindings_provider().encode_prompt, engine.tokenizer, text))

    async def _encode_chat(self, engine: Any, messages: list[dict[str, str]]) -> list[int]:
        num_chars = sum(len(message["content"]) for message in messages)
        check_prompt_chars(num_chars, await self._char_limit(engine), engine.max_model_len, "messages")
        return list(await self._off_loop(self._bindings_provider().encode_chat, engine.tokenizer, messages))

    def _check_stop_token_ids(self, engine: Any, token_ids: list[int] | None) -> None:
        vocab_size = engine.model_config.vocab_size
        for token_id in token_ids or ():
            if not 0 <= token_id < vocab_size:
                raise errors.invalid_request(f"stop_token_ids: token id {token_id} is outside the vocabulary "
                                             f"[0, {vocab_size})", "stop_token_ids")

    def resolve_model(self, requested: str | None) -> tuple[str, EngineClient]:
        """The served name and the engine client of the model a request names (None: the default one);
        404 model_not_found for a model this replica does not serve."""
        models = self._served_models()
        served = next(iter(models)) if requested is None else requested
        if served not in models:
            raise errors.model_not_found(requested)
        return served, self.engine().for_model(models[served])

    def _max_tokens(self, engine: EngineClient, num_prompt_tokens: int, requested: int | None, param: str) -> int:
        max_model_len = engine.max_model_len
        if num_prompt_tokens == 0:
            raise errors.invalid_request("The prompt is empty after tokenization.", param)
        if requested is None:
            if num_prompt_tokens >= max_model_len:
                raise errors.context_length_exceeded(max_model_len, num_prompt_tokens, None, param)
            return max_model_len - num_prompt_tokens
        if num_prompt_tokens + requested > max_model_len:
            raise errors.context_length_exceeded(max_model_len, num_prompt_tokens, requested, param)
        return requested

    async def _start(self, engine: EngineClient, prefix: str, prompt_ids: Sequence[int],
                     sampling_kwargs: list[SamplingKwargs], priority: int = 0,
                     model: str | None = None) -> tuple[str, GenerationRun]:
        bindings = self._bindings_provider()
        params = [bindings.sampling_params_cls(**kwargs) for kwargs in sampling_kwargs]
        response_id = new_id(prefix)
        arrival_time = time.monotonic()
        prompt = tuple(prompt_ids)
        group = response_id if len(params) > 1 else None  # n > 1: the engine prefills the prompt once, forks its KV
        requests = [GenerateRequest(f"{response_id}-{index}", prompt, sampling, arrival_time, priority,
                                    prompt_group=group) for index, sampling in enumerate(params)]
        if self.is_draining:
            raise errors.shutting_down()
        run = GenerationRun(engine, requests, self._metrics, self._relays, model_name=model)
        self._runs.add(run)
        run.on_close(self._runs.discard)
        try:
            await run.start()
        except BaseException:
            await run.close()
            raise
        return response_id, run

    def _token_text(self, engine: EngineClient, token_id: int) -> str:
        return self._bindings_provider().decode_token(engine.tokenizer, token_id)

    @staticmethod
    def _check_output(output: RequestOutput) -> None:
        if output.finish_reason == "error":
            trace_id = errors.log_internal(f"engine failed request {output.request_id}",
                                           detail=output.error or "no detail")
            raise errors.internal_error(trace_id)
        if output.finish_reason == "abort":  # the client is still here (else nothing reads this): the server
            raise errors.aborted()

    # ---- /v1/completions --------------------------------------------------------------------------

    async def completions(self, request: CompletionRequest):
        model, engine = self.resolve_model(request.model)
        self._check_stop_token_ids(engine, request.stop_token_ids)
        if isinstance(request.prompt, str):
            prompt_ids = await self._encode_prompt(engine, request.prompt)
        else:
            prompt_ids = self._checked_token_ids(engine, request.prompt)
        max_tokens = self._max_tokens(engine, len(prompt_ids), request.max_tokens, "prompt")
        sampling_kwargs = request.sampling_kwargs(max_tokens, self._default_sampling)
        response_id, run = await self._start(engine, "cmpl", prompt_ids, sampling_kwargs, request.priority, model)
        created = now_s()
        if request.stream:
            stream = self._completion_stream(engine, run, response_id, created, model, request.include_usage,
                                             request.logprobs is not None, len(prompt_ids))
            return _RunStreamingResponse(stream, run)
        try:
            texts = [""] * request.n
            logprobs = [CompletionLogprobs() if request.logprobs is not None else None
                        for _ in range(request.n)]
            finish_reasons: list[str | None] = [None] * request.n
            num_output_tokens = [0] * request.n
            async for index, output in run.outputs():
                self._check_output(output)
                if logprobs[index] is not None:
                    self._extend_completion_logprobs(engine, logprobs[index], output.logprobs,
                                                     len(texts[index]))
                texts[index] += output.text_delta
                num_output_tokens[index] = max(output.num_output_tokens,
                                               num_output_tokens[index] + len(output.new_token_ids))
                finish_reasons[index] = output.finish_reason
        finally:
            await run.close()
        choices = [CompletionChoice(index=index, text=texts[index], logprobs=logprobs[index],
                                    finish_reason=finish_reasons[index]) for index in range(request.n)]
        usage = UsageInfo.of(len(prompt_ids), sum(num_output_tokens))
        body = CompletionResponse(id=response_id, created=created, model=model, choices=choices, usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    def _checked_token_ids(self, engine: EngineClient, token_ids: list[int]) -> list[int]:
        vocab_size = engine.model_config.vocab_size
        for token_id in token_ids:
            if not 0 <= token_id < vocab_size:
                raise errors.invalid_request(f"token id {token_id} is outside the vocabulary "
                                             f"[0, {vocab_size})", "prompt")
        return list(token_ids)

    def _extend_completion_logprobs(self, engine: EngineClient, target: CompletionLogprobs,
                                    entries: Sequence[TokenLogprob], text_offset: int) -> None:
        for entry in entries:
            token = self._token_text(engine, entry.token_id)
            target.tokens.append(token)
            target.token_logprobs.append(entry.logprob)
            target.top_logprobs.append({self._token_text(engine, token_id): logprob
                                        for token_id, logprob in entry.top})
            target.text_offset.append(text_offset)
            text_offset += len(token)

    async def _completion_stream(self, engine: EngineClient, run: GenerationRun, response_id: str, created: int,
                                 model: str, include_usage: bool, wants_logprobs: bool,
                                 num_prompt_tokens: int) -> AsyncIterator[str]:
        num_output_tokens: dict[int, int] = {}
        text_lengths: dict[int, int] = {}
        try:
            async for index, output in run.outputs():
                self._check_output(output)
                num_output_tokens[index] = max(output.num_output_tokens,
                                               num_output_tokens.get(index, 0) + len(output.new_token_ids))
                if not (output.text_delta or output.is_finished or output.logprobs):
                    continue
                logprobs = None
                if wants_logprobs:
                    logprobs = CompletionLogprobs()
                    self._extend_completion_logprobs(engine, logprobs, output.logprobs,
                                                     text_lengths.get(index, 0))
                text_lengths[index] = text_lengths.get(index, 0) + len(output.text_delta)
                choice = CompletionChoice(index=index, text=output.text_delta, logprobs=logprobs,
                                          finish_reason=output.finish_reason)
                chunk = CompletionResponse(id=response_id, created=created, model=model, choices=[choice])
                yield _sse(chunk.model_dump_json(exclude=None if include_usage else {"usage"}))
            if include_usage:
                usage = UsageInfo.of(num_prompt_tokens, sum(num_output_tokens.values()))
                chunk = CompletionResponse(id=response_id, created=created, model=model, choices=[],
                                           usage=usage)
                yield _sse(chunk.model_dump_json())
            yield _sse("[DONE]")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield self._stream_error(exc)
        finally:
            await run.close()

    def _stream_error(self, exc: Exception) -> str:
        error = errors.from_engine_error(exc)
        if error.status >= 500:
            logger.warning("stream failed: %s", error.message)
        self._metrics.record_error(error.status)
        return errors.sse_error_events(error)

    # ---- /v1/chat/completions ---------------------------------------------------------------------

    async def chat(self, request: ChatCompletionRequest):
        model, engine = self.resolve_model(request.model)
        self._check_stop_token_ids(engine, request.stop_token_ids)
        prompt_ids = await self._encode_chat(engine, request.chat_messages())
        max_tokens = self._max_tokens(engine, len(prompt_ids), request.requested_max_tokens, "messages")
        response_id, run = await self._start(engine, "chatcmpl", prompt_ids,
                                             request.sampling_kwargs(max_tokens, self._default_sampling),
                                             request.priority, model)
        created = now_s()
        if request.stream:
            stream = self._chat_stream(engine, run, response_id, created, model, request, len(prompt_ids))
            return _RunStreamingResponse(stream, run)
        try:
            texts = [""] * request.n
            logprobs = [ChatLogprobs() if request.logprobs else None for _ in range(request.n)]
            finish_reasons: list[str | None] = [None] * request.n
            num_output_tokens = [0] * request.n
            async for index, output in run.outputs():
                self._check_output(output)
                if logprobs[index] is not None:
                    logprobs[index].content.extend(self._chat_logprobs(engine, output.logprobs))
                texts[index] += output.text_delta
                num_output_tokens[index] = max(output.num_output_tokens,
                                               num_output_tokens[index] + len(output.new_token_ids))
                finish_reasons[index] = output.finish_reason
        finally:
            await run.close()
        choices = [ChatChoice(index=index, message=AssistantMessage(content=texts[index]),
                              logprobs=logprobs[index], finish_reason=finish_reasons[index])
                   for index in range(request.n)]
        usage = UsageInfo.of(len(prompt_ids), sum(num_output_tokens))
        body = ChatCompletionResponse(id=response_id, created=created, model=model, choices=choices,
                                      usage=usage)
        return JSONResponse(body.model_dump(mode="json"))

    def _chat_logprobs(self, engine: EngineClient, entries: Sequence[TokenLogprob]) -> list[ChatTokenLogprob]:
        content = []
        for entry in entries:
            token = self._token_text(engine, entry.token_id)
            top = []
            for token_id, logprob in entry.top:
                text = self._token_text(engine, token_id)
                top.append(TopLogprob(token=text, logprob=logprob, bytes=list(text.encode())))
            content.append(ChatTokenLogprob(token=token, logprob=entry.logprob, bytes=list(token.encode()),
                                            top_logprobs=top))
        return content

    async def _chat_stream(self, engine: EngineClient, run: GenerationRun, response_id: str, created: int,
                           model: str, request: ChatCompletionRequest,
                           num_prompt_tokens: int) -> AsyncIterator[str]:
        include_usage = request.include_usage

        def chunk(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> str:
            body = ChatCompletionChunk(id=response_id, created=created, model=model, choices=choices,
                                       usage=usage)
            return _sse(body.model_dump_json(exclude=None if include_usage else {"usage"}))

        def choice(index: int, delta: DeltaMessage, logprobs=None, finish_reason=None) -> ChatStreamChoice:
            return ChatStreamChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)

        num_output_tokens: dict[int, int] = {}
        try:
            for index in range(request.n):
                yield chunk([choice(index, DeltaMessage(role="assistant", content=""))])
            async for index, output in run.outputs():
                self._check_output(output)
                num_output_tokens[index] = max(output.num_output_tokens,
                                               num_output_tokens.get(index, 0) + len(output.new_token_ids))
                if output.text_delta or output.logprobs:
                    logprobs = None
                    if request.logprobs:
                        logprobs = ChatLogprobs(content=self._chat_logprobs(engine, output.logprobs))
                    yield chunk([choice(index, DeltaMessage(content=output.text_delta), logprobs)])
                if output.is_finished:
                    yield chunk([choice(index, DeltaMessage(), finish_reason=output.finish_reason)])
            if include_usage:
                usage = UsageInfo.of(num_prompt_tokens, sum(num_output_tokens.values()))
                yield chunk([], usage=usage)
            yield _sse("[DONE]")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            yield self._stream_error(exc)
        finally:
            await run.close()
