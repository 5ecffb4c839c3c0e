"""Ray Serve autoscaling that follows the packing policy: `kv_packing_policy`.

Serve stops the *newest* replica when it scales down (its deployment scheduler prefers newer replicas), so
the `balance+pack` migration policy with `drain: newest` empties exactly that replica, request by request,
by live migration. This policy lets Serve scale up as its default (ongoing-requests) policy says, but scales
down only one replica at a time and only when the newest replica reports it is drained: the packing policy
chose it, it has no request left in its engine (its KV memory is free) and relays no stream any more (a
migrated request's client stays connected to the replica it started on, which relays the new replica's
tokens until the end). So Serve stops a replica with nothing left to cut off.

Replicas publish the numbers through `LLMServer.record_autoscaling_stats` (`autoscaling_metrics` below);
Serve hands their aggregates to the policy as `ctx.aggregated_metrics`. Enable it in serve_config.yaml:

    autoscaling_config:
      min_replicas: 1
      max_replicas: 4
      policy: {policy_function: "deployments.cluster.autoscaling:kv_packing_policy"}

with `migration_policy: balance+pack` and `migration_policy_options: {drain: newest}` in the app's args.
"""

from __future__ import annotations

from typing import Any

IS_DRAINED = "elastic_is_drained"
STARTED_AT = "elastic_started_at"
KV_LOAD = "elastic_kv_load"


def autoscaling_metrics(stats: Any, is_draining: bool, started_at: float, num_relays: int = 0) -> dict[str, float]:
    """One replica's custom autoscaling metrics from its EngineStats. Drained: the packing policy is draining
    it, its engine holds no request and it relays no migrated stream (its HTTP handlers would be cut)."""
    is_empty = stats.num_running + stats.num_waiting + stats.num_swapped == 0 and num_relays == 0
    return {IS_DRAINED: float(is_draining and is_empty), STARTED_AT: started_at, KV_LOAD: float(stats.kv_usage)}


def kv_packing_policy(ctx: Any) -> tuple[float, dict[str, Any]]:
    """Serve's default decision upwards; downwards, one replica, only when the newest one is drained."""
    from ray.serve.autoscaling_policy import replica_queue_length_autoscaling_policy

    desired, state = replica_queue_length_autoscaling_policy(ctx)
    metrics = ctx.aggregated_metrics or {}
    return packing_decision(desired, ctx.current_num_replicas, list(ctx.running_replicas),
                            metrics.get(IS_DRAINED, {}), metrics.get(STARTED_AT, {})), state


def packing_decision(desired: int, current: int, running: list[Any], drained: dict[Any, float],
                     started: dict[Any, float]) -> int:
    """The replica count: `desired` (Serve's queue-length decision) upwards; downwards one replica, and only
    when the newest running one is drained (pure: the simulator runs it too)."""
    if desired > current or current <= 1:
        return desired
    if len(running) < current or any(replica not in started for replica in running):
        return current  # a replica has not reported yet: hold
    newest = max(running, key=lambda replica: started[replica])
    return current - 1 if drained.get(newest, 0.0) >= 1.0 else current
