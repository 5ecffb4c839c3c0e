"""The engine helpers the HTTP layer calls besides the engine itself (an engine.api.EngineClient).

Bundled in one object so a test passes fakes in (an engine with a toy tokenizer needs a matching prompt
encoder) and the server uses the real ones, imported only when first needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deployments.ingress.validation import longest_token_chars
from engine.api import Tokenizer
from engine.sampling_params import SamplingParams


def _decode_token(tokenizer: Tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


@dataclass(frozen=True)
class EngineBindings:
    sampling_params_cls: Callable[..., SamplingParams]
    encode_prompt: Callable[[Tokenizer, str], Sequence[int]]
    encode_chat: Callable[[Tokenizer, list[dict[str, str]]], Sequence[int]]
    decode_token: Callable[[Tokenizer, int], str] = _decode_token
    # Bounds a prompt's length before tokenising (deployments/ingress/validation.py prompt_char_limit).
    longest_token_chars: Callable[[Tokenizer], int] = longest_token_chars

    @classmethod
    def from_engine_package(cls) -> EngineBindings:
        from engine.sampling_params import SamplingParams
        from engine.text.tokenizer import encode_chat, encode_prompt

        return cls(sampling_params_cls=SamplingParams, encode_prompt=encode_prompt, encode_chat=encode_chat)
