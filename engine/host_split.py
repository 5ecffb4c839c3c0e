"""How a request's KV splits between a `layerwise` engine's device and its host (pure Python, no torch).

One rule, two users: a migration destination's `LayerwiseOffload.layers_to_import` (engine/core/offload_policy.py)
and the cluster's migration policies (deployments/migration/policy.py, through the typed telemetry of
deployments/telemetry.py; the controller and the simulator both run them), so the controller places a request on
a destination exactly when that destination's reserve would take it.

- `HostSplit`: what one request costs with its top `num_host_layers` layers on the host: the device chunks of
  the other layers, the host pages of these (K and V of every page: HostBuffer slots, or host-tier chunks in
  place) and the staging chunks its next decode takes when the host pages are copied in (0 in place).
- `HostRoom`: what a `layerwise` engine's host can still take (the same page units), and whether it stages
  copies (`copy`) or reads host pages in place.
- `fewest_host_layers`: admission's rule, the fewest top layers on the host that make the device part fit,
  as long as the host holds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class HostSplit:
    num_host_layers: int  # its top layers on the host: layers [num_layers - num_host_layers, num_layers)
    device_chunks: int  # pool chunks the other layers' KV takes
    host_pages: int  # host pages these layers' KV takes (2 per page per layer: K and V)
    staging_chunks: int  # staging its next decode needs when host pages are copied in (0 is charged in place)

    def device_need(self, staged: bool) -> int:
        """Device chunks it needs to run: its device part, plus the staging when the host pages are copied in."""
        return self.device_chunks + (self.staging_chunks if staged else 0)


@dataclass(frozen=True)
class HostRoom:
    pages: int  # host pages offloaded layers may still take (HostBuffer slots; in place: host-tier chunks)
    staged: bool = True  # True: host pages are copied into staging chunks (`copy`); False: read in place


def fewest_host_layers(splits: Iterable[HostSplit], available: int, host: HostRoom) -> HostSplit | None:
    """The first of `splits` (ordered by `num_host_layers`, ascending) whose device need fits `available`
    chunks, if the host holds its pages; None if none does (host pages grow with the layers, so the first split
    the host cannot hold ends the search)."""
    for split in splits:
        if split.host_pages > host.pages:
            return None
        if split.device_need(host.staged) <= available:
            return split
    return None
