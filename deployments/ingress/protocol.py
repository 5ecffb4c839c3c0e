"""OpenAI-compatible request and response schemas, and their translation to engine sampling knobs.

Requests ignore unknown fields (clients send many optional extras) but reject values we cannot honour
(echo, non-text content parts) instead of silently doing something else. Booleans are strict
(`"stream": "yes"` is a 400, as at OpenAI), every text field is checked for lone surrogates before any field
is read (deployments/ingress/validation.py), and the limits OpenAI enforces (temperature <= 2, stop strings,
logprobs) are schema constraints, so /openapi.json documents them. Other sampling values are passed to the
engine's `SamplingParams` only when the client set them, so the engine's defaults stay the single source of
truth; the engine validates their ranges and raises `InvalidRequestError(message, param)`.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    field_validator,
    model_serializer,
    model_validator,
)

from deployments.ingress.validation import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    MAX_TEMPERATURE,
    reject_invalid_text,
)

MAX_LOGPROBS = 20
MAX_CHOICES = 16
# Knobs a server may give defaults for (AppArgs.default_sampling), used when a request leaves them out.
DEFAULTABLE_SAMPLING = frozenset({"temperature", "top_p", "top_k", "min_p", "presence_penalty",
                                  "frequency_penalty", "repetition_penalty", "min_tokens", "stop",
                                  "stop_token_ids", "ignore_eos", "skip_special_tokens"})
# Keyword arguments of engine.sampling_params.SamplingParams: numbers, flags, stop strings, stop token ids.
SamplingValue = float | int | bool | str | list[str] | list[int] | None
SamplingKwargs = dict[str, SamplingValue]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class BodyRequest(_Request):
    """A whole request body: its text is checked for lone surrogates before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _valid_text(cls, data):
        reject_invalid_text(data)
        return data


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _SamplingFields(BodyRequest):
    """Knobs shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM extras)."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=MAX_TEMPERATURE)
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 63)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    ignore_eos: StrictBool | None = None
    stop_token_ids: list[int] | None = Field(default=None, max_length=MAX_STOP_TOKEN_IDS)
    skip_special_tokens: StrictBool | None = None
    priority: int = 0  # vLLM's: lower is more urgent; the request's SLO class (engine/core/slo.py)

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed (got {len(stops)})")
        for text in stops:
            if not text:
                raise ValueError("a stop string must not be empty")
            if len(text) > MAX_STOP_CHARS:
                raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters (got {len(text)})")
        return stop

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _common_sampling_kwargs(self, defaults: SamplingKwargs | None = None) -> SamplingKwargs:
        """What the client set, over the server's defaults (the engine's own defaults apply to the rest)."""
        names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens")
        kwargs = dict(defaults or {})
        kwargs.update({name: getattr(self, name) for name in names if getattr(self, name) is not None})
        if self.stop is not None:
            kwargs["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        return kwargs


def sampling_kwargs_per_choice(base: SamplingKwargs, seed: int | None, n: int) -> list[SamplingKwargs]:
    """One engine request per choice (the engine sees n=1). With a seed, choice i uses seed + i so the
    choices differ but the whole response stays reproducible."""
    per_choice = []
    for index in range(n):
        kwargs = dict(base, n=1)
        if seed is not None:
            kwargs["seed"] = seed + index
        per_choice.append(kwargs)
    return per_choice


class CompletionRequest(_SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: StrictInt | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # true/false are 400, as at OpenAI
    echo: StrictBool = False

    @field_validator("prompt")
    @classmethod
    def _single_prompt(cls, prompt):
        if isinstance(prompt, list):
            if not prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(prompt[0], str | list):
                if len(prompt) != 1:
                    raise ValueError("only one prompt per request is supported (got a batch of "
                                     f"{len(prompt)})")
                prompt = prompt[0]
                if isinstance(prompt, list) and not prompt:
                    raise ValueError("prompt must not be empty")
        if isinstance(prompt, str) and not prompt:
            raise ValueError("prompt must not be empty")
        return prompt

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo=true is not supported")
        return echo

    def sampling_kwargs(self, max_tokens: int, defaults: SamplingKwargs | None = None) -> list[SamplingKwargs]:
        base = self._common_sampling_kwargs(defaults)
        base["max_tokens"] = max_tokens
        if self.logprobs is not None:
            base["logprobs"] = self.logprobs
        return sampling_kwargs_per_choice(base, self.seed, self.n)


class ContentPart(_Request):
    type: str
    text: str | None = None


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                if part.type != "text" or part.text is None:
                    raise ValueError(f"only text content parts are supported (got type {part.type!r})")
        return content

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text or "" for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: StrictBool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, str]]:
        return [{"role": message.role, "content": message.text()} for message in self.messages]

    def sampling_kwargs(self, max_tokens: int, defaults: SamplingKwargs | None = None) -> list[SamplingKwargs]:
        base = self._common_sampling_kwargs(defaults)
        base["max_tokens"] = max_tokens
        if self.logprobs:
            base["logprobs"] = self.top_logprobs or 0
        return sampling_kwargs_per_choice(base, self.seed, self.n)


# ---- responses ---------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> UsageInfo:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    """Only the fields a chunk carries: `{"role": ..., "content": ""}`, `{"content": ...}` or `{}`."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _omit_absent(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "elastic-serve"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
