"""deployments/cluster/autoscaling.py: Serve's autoscaler scales down only a replica the packing policy drained.

The policy function is called with Ray Serve's own AutoscalingContext (as Serve's controller would) and
the custom metrics replicas publish through `LLMServer.record_autoscaling_stats`."""

from __future__ import annotations

from types import SimpleNamespace

from ray.serve._private.common import DeploymentID, ReplicaID
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.cluster.autoscaling import IS_DRAINED, KV_LOAD, STARTED_AT, autoscaling_metrics, kv_packing_policy

DEPLOYMENT = DeploymentID("LLMServer", "llm")
REPLICAS = [ReplicaID(name, DEPLOYMENT) for name in ("old", "mid", "new")]


def context(num_requests: float, drained: dict[str, float], started: dict[str, float] | None = None,
            replicas: list[ReplicaID] = REPLICAS) -> AutoscalingContext:
    started = started if started is not None else {"old": 1.0, "mid": 2.0, "new": 3.0}
    by_id = {replica.unique_id: replica for replica in replicas}
    metrics = {IS_DRAINED: {by_id[name]: value for name, value in drained.items() if name in by_id},
               STARTED_AT: {by_id[name]: value for name, value in started.items() if name in by_id}}
    return AutoscalingContext(
        deployment_id=DEPLOYMENT, deployment_name="LLMServer", app_name="llm", current_num_replicas=len(replicas),
        target_num_replicas=len(replicas), running_replicas=replicas, total_num_requests=num_requests,
        total_queued_requests=0.0, aggregated_metrics=metrics, raw_metrics={}, capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=8, policy_state={}, last_scale_up_time=None, last_scale_down_time=None,
        current_time=0.0, config=AutoscalingConfig(min_replicas=1, max_replicas=8, target_ongoing_requests=8))


def test_scales_down_by_one_only_when_the_newest_replica_is_drained():
    assert kv_packing_policy(context(2.0, {"old": 0, "mid": 0, "new": 1}))[0] == 2
    # an older replica drained: Serve would stop the newest one, which still holds requests, so hold
    assert kv_packing_policy(context(2.0, {"old": 1, "mid": 0, "new": 0}))[0] == 3
    assert kv_packing_policy(context(2.0, {"old": 0, "mid": 0, "new": 0}))[0] == 3


def test_scales_up_as_serves_default_policy_says():
    desired, _ = kv_packing_policy(context(80.0, {"old": 0, "mid": 0, "new": 1}))  # 80 ongoing / 8 per replica
    assert desired == 10


def test_holds_while_a_replica_has_not_reported():
    assert kv_packing_policy(context(2.0, {"new": 1}, started={"old": 1.0, "new": 3.0}))[0] == 3


def test_replica_metrics_drained_means_draining_and_empty():
    def stats(running, waiting=0, swapped=0):
        return SimpleNamespace(num_running=running, num_waiting=waiting, num_swapped=swapped, kv_usage=0.25)

    assert autoscaling_metrics(stats(0), True, 5.0) == {IS_DRAINED: 1.0, STARTED_AT: 5.0, KV_LOAD: 0.25}
    assert autoscaling_metrics(stats(1), True, 5.0)[IS_DRAINED] == 0.0
    assert autoscaling_metrics(stats(0, swapped=1), True, 5.0)[IS_DRAINED] == 0.0
    assert autoscaling_metrics(stats(0), False, 5.0)[IS_DRAINED] == 0.0
    assert autoscaling_metrics(stats(0), True, 5.0, num_relays=1)[IS_DRAINED] == 0.0  # still relays a stream
