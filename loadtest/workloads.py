"""What the load test sends: prompt/output length distributions, rendered into sessions, saved as JSON.

A workload is a set of named pools of sessions ("main" for the steady traffic, "burst" for the long prompts
of a long-context burst). A session is one or more turns sent one after another by the same user; single
turn workloads have one turn per session. Each turn carries both renderings of its prompt: `prompt` for
/v1/completions and `messages` for /v1/chat/completions, so one workload drives either endpoint.

Generation happens in the runner's process (it may need the tokenizer, see loadtest/tokens.py) and the
Locust process only reads the JSON file. Prompt lengths are exact under the counter the workload was made
with (`is_token_exact`); output lengths are forced with ignore_eos/min_tokens.

Every session starts with different words, so a server with a prefix cache gets hits only where a workload
means it to (the shared-prefix workload), not from prompts repeating.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtest.text import TextMaker
from loadtest.tokens import TokenCounter

USER_LABEL = "User:"
AGENT_LABEL = "Agent:"  # one token, unlike "Assistant" (two): keeps word counts exact for SmolLM2


@dataclass(frozen=True)
class Turn:
    prompt: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    num_prompt_tokens: int  # of `prompt`, under the workload's counter (chat adds its template's tokens)
    max_tokens: int
    # tokens at the start of `prompt` that an earlier request of the run already sent (an upper bound on
    # the prefix-cache hits; servers cache whole blocks)
    num_shared_prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def chat_messages(self) -> list[dict]:
        return [{"role": role, "content": content} for role, content in self.messages]


@dataclass(frozen=True)
class Session:
    session_id: str
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Workload:
    name: str
    seed: int
    counter_name: str
    is_token_exact: bool
    pools: dict[str, tuple[Session, ...]]
    params: dict = field(default_factory=dict)

    def stats(self) -> dict:
        result = {}
        for pool, sessions in self.pools.items():
            turns = [turn for session in sessions for turn in session.turns]
            prompt_tokens = sum(turn.num_prompt_tokens for turn in turns)
            result[pool] = {
                "num_sessions": len(sessions),
                "num_requests": len(turns),
                "mean_prompt_tokens": prompt_tokens / len(turns) if turns else 0.0,
                "mean_output_tokens": sum(turn.max_tokens for turn in turns) / len(turns) if turns else 0.0,
                "max_prompt_tokens": max((turn.num_prompt_tokens for turn in turns), default=0),
                "expected_prefix_hit_rate": (
                    sum(turn.num_shared_prefix_tokens for turn in turns) / prompt_tokens if prompt_tokens else 0.0
                ),
            }
        return result

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict) -> Workload:
        pools = {
            pool: tuple(
                Session(
                    session_id=session["session_id"],
                    turns=tuple(
                        Turn(**{**turn, "messages": tuple(tuple(message) for message in turn["messages"])})
                        for turn in session["turns"]
                    ),
                )
                for session in sessions
            )
            for pool, sessions in data["pools"].items()
        }
        return cls(**{**data, "pools": pools})

    @classmethod
    def load(cls, path: str | Path) -> Workload:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def single_turn(session_id: str, prompt: str, num_prompt_tokens: int, max_tokens: int) -> Session:
    turn = Turn(prompt=prompt, messages=(("user", prompt),), num_prompt_tokens=num_prompt_tokens, max_tokens=max_tokens)
    return Session(session_id=session_id, turns=(turn,))


def clipped_lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return int(min(high, max(low, round(rng.lognormvariate(math.log(median), sigma)))))


# ---- length distributions (the registry) -------------------------------------------------------------


@dataclass(frozen=True)
class FixedLengths:
    """Every request the same: the classic 128-in/128-out throughput benchmark."""

    num_prompt_tokens: int = 128
    num_output_tokens: int = 128

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 1 or self.num_output_tokens < 1:
            raise ValueError("lengths must be >= 1")

    def sessions(self, maker: TextMaker, num_sessions: int, prefix: str) -> tuple[Session, ...]:
        return tuple(
            single_turn(
                f"{prefix}{index}", maker.text(self.num_prompt_tokens), self.num_prompt_tokens, self.num_output_tokens
            )
            for index in range(num_sessions)
        )


@dataclass(frozen=True)
class ShareGptLike:
    """Long-tailed lengths shaped like ShareGPT conversations (no download): clipped log-normals.

    Medians and spreads follow the ShareGPT_V3 set as vLLM's benchmark samples it (most prompts short, a
    tail of long ones; outputs a bit longer than prompts at the median), scaled to what a 2-core box serves.
    """

    prompt_median: float = 120
    prompt_sigma: float = 1.0
    prompt_range: tuple[int, int] = (8, 1024)
    output_median: float = 128
    output_sigma: float = 0.8
    output_range: tuple[int, int] = (8, 512)

    def sessions(self, maker: TextMaker, num_sessions: int, prefix: str) -> tuple[Session, ...]:
        result = []
        for index in range(num_sessions):
            num_prompt = clipped_lognormal(maker.rng, self.prompt_median, self.prompt_sigma, *self.prompt_range)
            num_output = clipped_lognormal(maker.rng, self.output_median, self.output_sigma, *self.output_range)
            result.append(single_turn(f"{prefix}{index}", maker.text(num_prompt), num_prompt, num_output))
        return tuple(result)


@dataclass(frozen=True)
class LongContext:
    """Prompts near the model's context: uniformly between 75% and 95% of what fits beside the output."""

    context_tokens: int = 4096
    num_output_tokens: int = 32
    fraction_range: tuple[float, float] = (0.75, 0.95)

    def __post_init__(self) -> None:
        if self.context_tokens <= self.num_output_tokens:
            raise ValueError("context_tokens must exceed num_output_tokens")
        low, high = self.fraction_range
        if not 0 < low <= high <= 1:
            raise ValueError(f"fraction_range must satisfy 0 < low <= high <= 1, got {self.fraction_range}")

    def sessions(self, maker: TextMaker, num_sessions: int, prefix: str) -> tuple[Session, ...]:
        room = self.context_tokens - self.num_output_tokens
        result = []
        for index in range(num_sessions):
            num_prompt = max(1, int(room * maker.rng.uniform(*self.fraction_range)))
            result.append(single_turn(f"{prefix}{index}", maker.text(num_prompt), num_prompt, self.num_output_tokens))
        return tuple(result)


@dataclass(frozen=True)
class SharedPrefix:
    """Multi-turn conversations behind one shared system prompt, sized for a target prefix-hit rate.

    Turn t re-sends everything of turn t-1 (system prompt, earlier messages, a canned agent reply) plus a new
    user message, so its shared prefix is the whole previous prompt; the first turn shares the system prompt
    with every other session. The system prompt's length is solved so that shared / total prompt tokens over
    the workload is `target_hit_rate` (0 if the turns alone already exceed it). The agent replies are canned
    text, not what the server answered, so the server's own output is never a cache hit.
    """

    target_hit_rate: float = 0.75
    num_turns: int = 4
    user_tokens: int = 64
    num_output_tokens: int = 64

    def __post_init__(self) -> None:
        if not 0 <= self.target_hit_rate < 1:
            raise ValueError(f"target_hit_rate must be in [0, 1), got {self.target_hit_rate}")
        if self.num_turns < 1:
            raise ValueError("num_turns must be >= 1")

    def sessions(self, maker: TextMaker, num_sessions: int, prefix: str) -> tuple[Session, ...]:
        # Hits and totals are both linear in the system prompt's length, so two trial lengths solve it.
        trial_rng_state = maker.rng.getstate()
        hit_rate_at = {}
        for trial_tokens in (0, 256):
            maker.rng.setstate(trial_rng_state)
            hit_rate_at[trial_tokens] = _hit_totals(self._build(maker, min(num_sessions, 8), prefix, trial_tokens))
        (hits_0, total_0), (hits_1, total_1) = hit_rate_at[0], hit_rate_at[256]
        hits_per_token, total_per_token = (hits_1 - hits_0) / 256, (total_1 - total_0) / 256
        target = self.target_hit_rate
        denominator = hits_per_token - target * total_per_token
        system_tokens = 0
        if denominator > 0:
            system_tokens = max(0, round((target * total_0 - hits_0) / denominator))
        maker.rng.setstate(trial_rng_state)
        return self._build(maker, num_sessions, prefix, system_tokens)

    def _build(self, maker: TextMaker, num_sessions: int, prefix: str, system_tokens: int) -> tuple[Session, ...]:
        counter = maker.counter
        system = maker.text(system_tokens) if system_tokens else ""
        num_system_tokens = counter.count(system)
        result = []
        for index in range(num_sessions):
            messages: list[tuple[str, str]] = [("system", system)] if system else []
            lines = [system] if system else []
            turns = []
            previous_prompt_tokens = num_system_tokens
            for _ in range(self.num_turns):
                user = maker.text(self.user_tokens)
                messages.append(("user", user))
                lines.append(f"{USER_LABEL} {user}")
                prompt = "\n".join(lines) + f"\n{AGENT_LABEL}"
                num_prompt = counter.count(prompt)
                turns.append(
                    Turn(
                        prompt=prompt,
                        messages=tuple(messages),
                        num_prompt_tokens=num_prompt,
                        max_tokens=self.num_output_tokens,
                        num_shared_prefix_tokens=previous_prompt_tokens,
                    )
                )
                reply = maker.text(self.num_output_tokens, is_continuation=True)
                messages.append(("assistant", reply.lstrip()))
                lines.append(f"{AGENT_LABEL}{reply}")
                previous_prompt_tokens = num_prompt
            result.append(Session(session_id=f"{prefix}{index}", turns=tuple(turns)))
        return tuple(result)


def _hit_totals(sessions: tuple[Session, ...]) -> tuple[float, float]:
    turns = [turn for session in sessions for turn in session.turns]
    return (
        sum(turn.num_shared_prefix_tokens for turn in turns) / len(sessions),
        sum(turn.num_prompt_tokens for turn in turns) / len(sessions),
    )


LengthDistribution = FixedLengths | ShareGptLike | LongContext | SharedPrefix

DISTRIBUTIONS: dict[str, Callable[..., LengthDistribution]] = {
    "fixed": FixedLengths,
    "sharegpt": ShareGptLike,
    "long-context": LongContext,
    "shared-prefix": SharedPrefix,
}


def make_distribution(name: str, **params) -> LengthDistribution:
    try:
        factory = DISTRIBUTIONS[name]
    except KeyError:
        raise ValueError(f"unknown distribution {name!r}; known: {sorted(DISTRIBUTIONS)}") from None
    return factory(**params)


@dataclass(frozen=True)
class PoolSpec:
    distribution: LengthDistribution
    num_sessions: int

    def __post_init__(self) -> None:
        if self.num_sessions < 1:
            raise ValueError("num_sessions must be >= 1")


def generate(name: str, pools: dict[str, PoolSpec], counter: TokenCounter, seed: int = 0) -> Workload:
    """Deterministic in (pools, counter, seed): each pool draws from its own seeded generator."""
    built = {}
    for pool, spec in pools.items():
        maker = TextMaker(counter, random.Random(f"{seed}:{pool}"))
        built[pool] = spec.distribution.sessions(maker, spec.num_sessions, prefix=f"{pool}-")
    params = {
        pool: {"distribution": type(spec.distribution).__name__, **asdict(spec.distribution)}
        for pool, spec in pools.items()
    }
    params = json.loads(json.dumps(params))  # as it will read back from the file (tuples become lists)
    return Workload(
        name=name, seed=seed, counter_name=counter.name, is_token_exact=counter.is_exact, pools=built, params=params
    )
