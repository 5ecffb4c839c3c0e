"""Carrying running requests across a change of who holds which layers (a pipeline forms or dissolves).

Each running request either keeps its KV — read out per layer from whichever replica holds the layer,
then imported into the new arrangement once the weights have moved — or recomputes it (its tokens so far
are kept either way, so nothing is lost or repeated). `CarryPolicy` decides per request: `copy`,
`recompute`, or `auto`, which copies when moving its KV bytes at `bandwidth_bytes_per_s` is predicted to
be faster than recomputing its tokens (the engine's own step-cost model). A request whose KV no longer
fits where it goes recomputes.
"""

from __future__ import annotations

from collections.abc import Callable
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


def snapshot(scheduler: Scheduler, read: Callable[[str, int], KVLayers], policy: CarryPolicy,
             bytes_per_token: int) -> dict[str, CarriedKV]:
    """The KV of every running request the policy copies (read before anything is freed)."""
    carried = {}
    for request in scheduler.running:
        num_tokens = request.num_computed_tokens
        if num_tokens and policy.copies(num_tokens, num_tokens * bytes_per_token, scheduler.cost_model):
            carried[request.request_id] = CarriedKV(num_tokens, read(request.request_id, num_tokens))
    return carried


def place(scheduler: Scheduler, request: Request, carried: CarriedKV | None) -> bool:
    """Adds a request taken from another scheduler: resident with its carried KV when it fits (True),
    otherwise waiting to recompute (False)."""
    kv = scheduler.kv
    if carried is not None and kv.reserve_import(request.request_id, carried.num_tokens):
        kv.write_kv(request.request_id, 0, carried.layers)
        kv.finish_import(request.request_id, carried.num_tokens)
        request.num_computed_tokens = carried.num_tokens
        scheduler.attach(request)
        return True
    request.status = RequestStatus.WAITING
    scheduler.requests[request.request_id] = request
    scheduler.waiting.append(request)
    return False
