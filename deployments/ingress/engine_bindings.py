"""The engine helpers the HTTP layer calls besides the AsyncEngine itself.

Bundled in one object so a test passes fakes in (an engine with a toy tokenizer needs a matching prompt
encoder) and the server uses the real ones, imported only when first needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from deployments.ingress.validation import longest_token_chars


async def check_engine_health(engine: Any) -> None:
    """Raises EngineDeadError when the engine's loop has stopped (its `check_health()` if it has one,
    else its `is_running` flag)."""
    check = getattr(engine, "check_health", None)
    if check is not None:
        await check()
    elif getattr(engine, "is_running", True) is False:
        from engine.api import EngineDeadError

        raise EngineDeadError("the engine loop is not running")


def _decode_token(tokenizer: Any, token_id: int) -> str:
    return tokenizer.decode([token_id])


@dataclass(frozen=True)
class EngineBindings:
    sampling_params_cls: Callable[..., Any]
    encode_prompt: Callable[[Any, str], Sequence[int]]
    encode_chat: Callable[[Any, list[dict[str, str]]], Sequence[int]]
    decode_token: Callable[[Any, int], str] = _decode_token
    # Bounds a prompt's length before tokenising (deployments/ingress/validation.py prompt_char_limit).
    longest_token_chars: Callable[[Any], int] = longest_token_chars

    @classmethod
    def from_engine_package(cls) -> EngineBindings:
        from engine.sampling_params import SamplingParams
        from engine.text.tokenizer import encode_chat, encode_prompt

        return cls(sampling_params_cls=SamplingParams, encode_prompt=encode_prompt, encode_chat=encode_chat)
