"""The router's part in migration, without Ray: a call that names `target_replica` goes to that replica only,
pinning for skewed loads, and a replica being drained gets new requests last."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.cluster.ranking import rank_by_headroom, route


def replica(unique_id, free=100, waiting=0, draining=False, now=100.0):
    stats = {"kv_free_chunks": free, "kv_usage": 0.0, "num_running": 0, "num_waiting": waiting,
             "timestamp": now - 0.1, "is_draining": draining}
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=unique_id), routing_stats=stats)


def ids(groups):
    return [sorted(r.replica_id.unique_id for r in group) for group in groups]


def test_a_targeted_call_goes_to_its_replica_only():
    replicas = [replica("a", free=10), replica("b", free=1000)]
    assert ids(route(replicas, {"target_replica": "a"}, now=100.0)) == [["a"]]
    # not a candidate (yet, or any more): no replica; Serve backs off and retries until the call times out
    assert ids(route(replicas, {"target_replica": "gone"}, now=100.0)) == [[]]


def test_untargeted_requests_rank_by_headroom_or_go_pinned():
    replicas = [replica("b", free=1000), replica("a", free=10)]
    assert ids(route(replicas, {}, now=100.0)) == [["b"], ["a"]]
    assert ids(route(replicas, None, now=100.0, pin_to_one_replica=True)) == [["a"], ["b"]]


def test_a_draining_replica_ranks_last():
    replicas = [replica("drained", free=1000, draining=True), replica("busy", free=10)]
    assert ids(rank_by_headroom(replicas, now=100.0)) == [["busy"], ["drained"]]
    only = [replica("drained", free=1000, draining=True)]
    assert ids(rank_by_headroom(only, now=100.0)) == [["drained"]]  # still served when it is the only one
