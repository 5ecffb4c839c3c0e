"""How one request wants its tokens chosen and when it stops.

Every check raises `InvalidRequestError(message, param=<field>)` so the HTTP layer can answer 400
with the offending field named, as OpenAI does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from engine.errors import InvalidRequestError

# Below this temperature sampling is argmax: dividing logits by ~0 only produces inf/nan.
GREEDY_TEMPERATURE = 1e-5
MAX_TOP_LOGPROBS = 20
PENALTY_RANGE = (-2.0, 2.0)
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 (below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * (probability of the most likely token)
    seed: int | None = None  # None = a fresh random seed per request
    presence_penalty: float = 0.0  # subtracted once from every token already in the output
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # CTRL/HF: divides positive / multiplies negative logits of seen tokens
    max_tokens: int = 16  # output tokens at most (OpenAI's completions default)
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    stop: tuple[str, ...] = ()  # output ends before the first of these strings (not included)
    stop_token_ids: tuple[int, ...] = ()  # output ends after any of these tokens
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    logprobs: int | None = None  # None = none; n = chosen token's logprob and the top-n alternatives
    n: int = 1  # completions per prompt
    skip_special_tokens: bool = True  # leave special tokens out of the text

    def __post_init__(self) -> None:
        # Accept lists and a lone stop string from JSON, but store hashable tuples.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if _is_int(self.temperature):
            object.__setattr__(self, "temperature", float(self.temperature))
        self._check()

    def _check(self) -> None:
        def fail(param: str, message: str) -> None:
            raise InvalidRequestError(f"{param}: {message}, got {getattr(self, param)!r}", param=param)

        if not _is_number(self.temperature) or self.temperature < 0:
            fail("temperature", "must be a number >= 0")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            fail("top_p", "must be in (0, 1]")
        if not _is_int(self.top_k) or (self.top_k < 1 and self.top_k not in (0, -1)):
            fail("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        seed = self.seed
        if seed is not None and not (_is_int(seed) and _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]):
            fail("seed", "must be a 64-bit integer")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not PENALTY_RANGE[0] <= value <= PENALTY_RANGE[1]:
                fail(name, "must be in [-2, 2]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0")
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            fail("max_tokens", "must be an integer >= 1")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            fail("stop", "must be a string or a list of non-empty strings")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            fail("stop_token_ids", "must be a list of token ids >= 0")
        if not isinstance(self.ignore_eos, bool):
            fail("ignore_eos", "must be a boolean")
        if self.logprobs is not None and (
            not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            fail("logprobs", f"must be an integer in [0, {MAX_TOP_LOGPROBS}]")
        if not _is_int(self.n) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not isinstance(self.skip_special_tokens, bool):
            fail("skip_special_tokens", "must be a boolean")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def has_top_k(self) -> bool:
        return self.top_k > 0

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (for migration); `SamplingParams(**d)` rebuilds it."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}
