"""Checks on request text before anything tokenises it, and the size limits that keep one request cheap.

JSON may carry lone UTF-16 surrogates (`"\\ud800"`): Python parses them into a `str` that no tokenizer, no
UTF-8 encoder and no log line can take. `reject_invalid_text` walks a parsed body once (every request model
calls it before its fields are read), so every text field, whatever its path, is refused with a 400 that
names it. The byte level (not UTF-8 at all) is refused earlier, by `BodyLimit` (middleware.py).

`prompt_char_limit` bounds a prompt's length in characters without tokenising it: no token of the model's
vocabulary is longer than `longest_token_chars` characters (a byte-level BPE entry has one character per
byte, and a decoded character is at least one byte), so a text longer than max_model_len times that cannot
fit the context, and is refused before the tokenizer spends seconds on it.
"""

from __future__ import annotations

from typing import Any

from deployments.ingress import errors

MAX_STOP_STRINGS = 16  # OpenAI allows 4; vLLM clients send more
MAX_STOP_CHARS = 1024  # per stop string
MAX_STOP_TOKEN_IDS = 256
MAX_TEMPERATURE = 2.0  # OpenAI's range is [0, 2]
DEFAULT_MAX_BODY_BYTES = 4 << 20


def _is_valid(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_invalid(body: Any) -> tuple | None:
    """The path of the first string (key or value) that is not valid Unicode, depth first in document
    order; iterative, so a deeply nested body cannot exhaust the stack."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if not _is_valid(value):
                return path
        elif isinstance(value, dict):
            for key in value:
                if isinstance(key, str) and not _is_valid(key):
                    return path
            stack.extend(reversed([(item, (*path, key)) for key, item in value.items()]))
        elif isinstance(value, list):
            stack.extend(reversed([(item, (*path, index)) for index, item in enumerate(value)]))
    return None


def reject_invalid_text(body: Any) -> None:
    """Raises a 400 naming the first field whose text is not valid Unicode (a lone surrogate)."""
    path = _first_invalid(body)
    if path is not None:
        param = ".".join(str(part) for part in path) or None
        where = f"{param}: " if param else ""
        raise errors.invalid_request(f"{where}the text contains a lone UTF-16 surrogate, which is not valid "
                                     "Unicode", param, "invalid_encoding")


def longest_token_chars(tokenizer: Any) -> int:
    """The longest vocabulary entry in characters (of its stored form, which is never shorter than its text)."""
    return max((len(token) for token in tokenizer.get_vocab()), default=1)


def prompt_char_limit(max_model_len: int, token_chars: int) -> int:
    return max_model_len * max(1, token_chars)


def check_prompt_chars(num_chars: int, limit: int, max_model_len: int, param: str) -> None:
    if num_chars > limit:
        raise errors.invalid_request(
            f"This model's maximum context length is {max_model_len} tokens, and your {param} has "
            f"{num_chars} characters, more than {max_model_len} tokens can hold. Please reduce its length.",
            param, "context_length_exceeded")
