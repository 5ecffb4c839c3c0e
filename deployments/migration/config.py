"""`MigrationConfig`: the replica side of live migration's settings (YAML `migration:`, deployments/args.py).

Apart from deployments/migration/source.py so that validating the YAML (`serve run`'s application-build task)
imports neither torch nor the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MigrationConfig:
    max_concurrent: int = 2  # migrations at once per replica, outgoing (and, separately, incoming)
    max_stages: int = 4  # KV copies while the request decodes, before the pause
    min_stage_tokens: int = 8  # a stage with fewer new tokens than this ends the staging
    growth_margin_tokens: int = 128  # the destination reserves this many tokens beyond the current length
    call_timeout_s: float = 10.0  # one call to the destination
    timeout_s: float = 60.0  # watchdog: a whole migration, and a reservation nobody adopts
    initial_bandwidth_bytes_per_s: float = 200e6  # until a transfer has been measured
    bandwidth_decay: float = 0.7  # weight of the old estimate in the moving average

    def __post_init__(self) -> None:
        if self.max_concurrent < 1 or self.max_stages < 1 or self.min_stage_tokens < 1:
            raise ValueError("max_concurrent, max_stages and min_stage_tokens must be >= 1")
        if self.growth_margin_tokens < 0:
            raise ValueError("growth_margin_tokens must be >= 0")
        if min(self.call_timeout_s, self.timeout_s, self.initial_bandwidth_bytes_per_s) <= 0:
            raise ValueError("timeouts and the initial bandwidth must be > 0")
        if not 0 <= self.bandwidth_decay < 1:
            raise ValueError("bandwidth_decay must be in [0, 1)")
