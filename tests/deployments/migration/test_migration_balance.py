"""The balance policy under a skewed load (slow: ~5 minutes on 2 busy cores): two real-engine replicas
whose router pins every new request to one of them, the same workload once with policy `none` and once with
`balance` (switched at run time), everything read from /v1/cluster (loadtest.bench.migration does the same
with a larger workload and prints the table). With `balance`, requests migrate to the idle replica, the
loaded replica preempts less and the two replicas' KV use comes closer."""

from __future__ import annotations

import pytest

from loadtest.bench.migration import LocalServe, SkewedWorkload, app_args, run_policy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
WORKLOAD = SkewedWorkload(num_requests=6, prompt_tokens=64, max_tokens=160, interval_s=0.3)


@pytest.fixture(scope="module")
def results():
    with LocalServe(app_args("570MiB", controller_name="migration-balance-test-controller")) as cluster:
        return {policy: run_policy(cluster.base_url, policy, WORKLOAD) for policy in ("none", "balance")}


def test_balance_moves_load_off_the_pinned_replica(results):
    none, balance = results["none"], results["balance"]
    for result in (none, balance):
        assert result.summary.num_ok == WORKLOAD.num_requests and result.summary.num_output_length_mismatches == 0
    other = next(replica for replica in none.peak_kv_usage if replica != none.loaded_replica)
    # none: everything on the pinned replica, which preempts; nothing moves
    assert none.preemptions[none.loaded_replica] > 0 and none.migrations["committed"] == 0
    assert none.peak_kv_usage[other] == 0
    # balance: migrations (all committed), the other replica works, fewer preemptions, closer KV use
    assert balance.migrations["committed"] >= 1 and balance.migrations["aborted"] == 0
    assert balance.peak_kv_usage[other] > 0
    assert balance.preemptions[balance.loaded_replica] < none.preemptions[none.loaded_replica]
    assert balance.mean_kv_gap < none.mean_kv_gap
    assert balance.mean_downtime_ms is not None
