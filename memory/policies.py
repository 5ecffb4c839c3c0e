"""Pool policies: who may grow, and whom the pool asks to give chunks back.

A policy answers two questions for `ElasticPool`, both without side effects:
* `headroom(client, num_held)`: how many more chunks `client` may hold (None: up to the budget);
* `reclaim_order(requester, clients)`: the clients to ask, in order, when free chunks run out.

Registry: `create_policy("elastic" | "static", num_chunks=..., chunk_bytes=..., **options)`.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

DEFAULT_RECLAIM_ORDER = ("kv", "activations")


class PoolPolicy(ABC):
    """Decides limits and reclaim order for an `ElasticPool`; holds no chunk state."""

    name: str = "abstract"

    @abstractmethod
    def headroom(self, client: str, num_held: int) -> int | None:
        """More chunks `client` may take beyond `num_held` (None: no per-client limit)."""

    @abstractmethod
    def reclaim_order(self, requester: str, clients: Sequence[str]) -> list[str]:
        """Clients to ask for chunks, first asked first; never contains `requester`."""


@dataclass(frozen=True)
class ElasticPolicy(PoolPolicy):
    """Any client may grow up to the whole budget. When free chunks run out, the pool reclaims from
    the other clients in `priority` order (listed names first, then the rest in registration order)."""

    priority: tuple[str, ...] = DEFAULT_RECLAIM_ORDER
    name: str = field(default="elastic", init=False)

    def __post_init__(self) -> None:
        if len(set(self.priority)) != len(self.priority):
            raise ValueError(f"reclaim priority has duplicates: {self.priority}")

    def headroom(self, client: str, num_held: int) -> int | None:
        return None

    def reclaim_order(self, requester: str, clients: Sequence[str]) -> list[str]:
        return list(_elastic_order(self.priority, requester, tuple(clients)))


@functools.lru_cache(maxsize=256)
def _elastic_order(priority: tuple[str, ...], requester: str, clients: tuple[str, ...]) -> tuple[str, ...]:
    """ElasticPolicy's order (cached: the scheduler asks for it for every request of every step)."""
    registered = set(clients)
    first = [name for name in priority if name in registered]
    rest = [name for name in clients if name not in priority]
    return tuple(name for name in first + rest if name != requester)


@dataclass(frozen=True)
class StaticPolicy(PoolPolicy):
    """The baseline: a fixed share of chunks per client set at start-up. A client never exceeds its
    share (absent clients have share 0) and nobody reclaims from anybody."""

    shares: Mapping[str, int]
    num_chunks: int
    name: str = field(default="static", init=False)

    def __post_init__(self) -> None:
        if any(share < 0 for share in self.shares.values()):
            raise ValueError(f"static shares must be >= 0: {dict(self.shares)}")
        if sum(self.shares.values()) > self.num_chunks:
            raise ValueError(f"static shares {dict(self.shares)} exceed the pool's {self.num_chunks} chunks")
        object.__setattr__(self, "shares", dict(self.shares))

    def headroom(self, client: str, num_held: int) -> int | None:
        return max(0, self.shares.get(client, 0) - num_held)

    def reclaim_order(self, requester: str, clients: Sequence[str]) -> list[str]:
        return []


PolicyFactory = Callable[..., PoolPolicy]
_FACTORIES: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make `create_policy(name, num_chunks=, chunk_bytes=, **options)` call `factory` with those."""
    if name in _FACTORIES and not replace:
        raise ValueError(f"pool policy {name!r} is already registered")
    _FACTORIES[name] = factory


def available_policies() -> tuple[str, ...]:
    """Registered policy names."""
    return tuple(sorted(_FACTORIES))


def create_policy(name: str, *, num_chunks: int, chunk_bytes: int, **options: object) -> PoolPolicy:
    """Build the policy registered as `name`. Unknown names raise KeyError; options a policy does
    not take raise TypeError."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        known = ", ".join(available_policies())
        raise KeyError(f"unknown pool policy {name!r}; registered: {known}") from None
    return factory(num_chunks=num_chunks, chunk_bytes=chunk_bytes, **options)


def _elastic(*, num_chunks: int, chunk_bytes: int, reclaim_order: Sequence[str] | None = None) -> PoolPolicy:
    return ElasticPolicy(DEFAULT_RECLAIM_ORDER if reclaim_order is None else tuple(reclaim_order))


def _static(*, num_chunks: int, chunk_bytes: int, static_split: Mapping[str, int] | None = None,
            static_split_bytes: Mapping[str, int] | None = None) -> PoolPolicy:
    if (static_split is None) == (static_split_bytes is None):
        raise ValueError("the static policy needs exactly one of static_split (chunks) or static_split_bytes")
    if static_split_bytes is not None:
        static_split = {client: num_bytes // chunk_bytes for client, num_bytes in static_split_bytes.items()}
    return StaticPolicy(dict(static_split), num_chunks)


register_policy("elastic", _elastic)
register_policy("static", _static)
