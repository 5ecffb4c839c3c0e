"""Carrying running requests across a change of who holds which layers (a pipeline forms or dissolves).

Each running request either keeps its KV — read out per layer from whichever replica holds the layer,
then imported into the new arrangement once the weights have moved — or recomputes it (its tokens so far
are kept either way, so nothing is lost or repeated). `CarryPolicy` decides per request: `copy`,
`recompute`, or `auto`, which copies when moving its KV bytes at `bandwidth_bytes_per_s` is predicted to
be faster than recomputing its tokens (the engine's own step-cost model), counting only the layers whose
KV changes replica (`to_copy`: the one choice of the in-process pair, the cross-process one and the
simulator). A request whose KV no longer fits where it goes recomputes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from engine.core.request import Request, RequestStatus
from engine.core.scheduler import Scheduler
from engine.core.step_cost import StepCostModel

KVLayers = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class CarryPolicy:
    mode: str = "auto"  # "auto" | "copy" | "recompute"
    bandwidth_bytes_per_s: float = 2e9  # KV between the pair (one process: a memory copy; else the network)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "copy", "recompute"):
            raise ValueError(f"carry mode must be auto, copy or recompute, got {self.mode!r}")
        if self.bandwidth_bytes_per_s <= 0:
            raise ValueError("bandwidth_bytes_per_s must be > 0")

    def copies(self, num_tokens: int, num_bytes: int, cost_model: StepCostModel) -> bool:
        if self.mode != "auto":
            return self.mode == "copy"
        return num_bytes / self.bandwidth_bytes_per_s * 1e3 < cost_model.predict_ms(num_tokens)


@dataclass(frozen=True)
class CarriedKV:
    num_tokens: int
    layers: KVLayers


def to_copy(policy: CarryPolicy, moves: Iterable[tuple[Request, int]], layer_bytes_per_token: float,
            cost_model: StepCostModel) -> dict[str, int]:
    """The requests whose KV the policy copies, with their tokens: `moves` pairs each running request with
    how many layers of its KV change replica (`layer_bytes_per_token`: K and V of one layer, one token).
    The one choice of the in-process pair, the cross-process one (remote.py, follower.py) and the
    simulator (loadtest/sim/pair.py)."""
    chosen = {}
    for request, num_layers in moves:
        tokens = request.num_computed_tokens
        if tokens and policy.copies(tokens, tokens * num_layers * layer_bytes_per_token, cost_model):
            chosen[request.request_id] = tokens
    return chosen


def snapshot(scheduler: Scheduler, read: Callable[[str, int], KVLayers], policy: CarryPolicy,
             layer_bytes_per_token: float, moved_layers: Callable[[Request], int]) -> dict[str, CarriedKV]:
    """The KV of every running request the policy copies (read before anything is freed);
    `moved_layers(request)`: how many of its layers' KV change replica."""
    chosen = to_copy(policy, [(request, moved_layers(request)) for request in scheduler.running],
                     layer_bytes_per_token, scheduler.cost_model)
    return {request_id: CarriedKV(tokens, read(request_id, tokens)) for request_id, tokens in chosen.items()}


def spread(num_layers: int, parts: dict[int, KVLayers]) -> KVLayers:
    """A full per-layer KV list from parts that start at the given layers; every other layer is an empty
    (zero-token) pair, which a layout writing only the layers it holds never reads."""
    some = next(layers for layers in parts.values() if layers)
    empty = (some[0][0][:0], some[0][1][:0])
    full: KVLayers = [empty] * num_layers
    for first, layers in parts.items():
        full[first:first + len(layers)] = layers
    return full


def place(scheduler: Scheduler, request: Request, carried: CarriedKV | None) -> bool:
    """Adds a request taken from another scheduler: resident with its carried KV when it fits (True),
    otherwise waiting to recompute (False)."""
    if reserve(scheduler, request, carried):
        settle(scheduler, request, carried)
        return True
    recompute(scheduler, request)
    return False


def reserve(scheduler: Scheduler, request: Request, carried: CarriedKV | None) -> bool:
    """`place`'s first half: a slot and every page for the carried KV (False, nothing held: it does not fit).
    A cross-process pair sends the layout log here, so the follower's pages exist before any KV is written."""
    return carried is not None and scheduler.kv.reserve_import(request.request_id, carried.num_tokens)


def settle(scheduler: Scheduler, request: Request, carried: CarriedKV) -> None:
    """`place`'s second half: writes the carried KV (each KV manager the layers it holds) and runs the request."""
    kv = scheduler.kv
    kv.write_kv(request.request_id, 0, carried.layers)
    kv.finish_import(request.request_id, carried.num_tokens)
    request.num_computed_tokens = carried.num_tokens
    scheduler.attach(request)


def recompute(scheduler: Scheduler, request: Request) -> None:
    request.status = RequestStatus.WAITING
    scheduler.requests[request.request_id] = request
    scheduler.waiting.append(request)
