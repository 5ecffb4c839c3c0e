"""Ray-level reliability (slow): real Ray Serve on 127.0.0.1, two LLMServer replicas around the fake engine,
with the proxy guard installed as `python -m deployments.launch` installs it. A disconnect storm leaves
both replicas idle (KV included); overload is a 503 with Retry-After through the proxy; SIGKILL of a replica
with streams in flight ends its streams with an error event and `[DONE]`, its waiting requests with a
retryable 503, and Serve replaces it. (Issue 15, failures 4 and the storm/overload checks.)"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.deployments.ray_cluster import LocalRayCluster
from tests.deployments.serve_helpers import cluster_view, wait_for, wait_for_fresh_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CONTROLLER = "reliability-test-controller"
FAKE = {"token_delay_s": 0.05, "max_model_len": 4096, "max_num_seqs": 4, "max_num_waiting": 4,
        "kv_total_chunks": 256, "tokens_per_chunk": 16}


@pytest.fixture(scope="module")
def cluster():
    from ray import serve

    from deployments.app import build_app

    cluster = LocalRayCluster()
    try:
        cluster.start()
        app = build_app({"engine_factory": "tests.deployments.fake_engine:create_fake_engine",
                         "engine_factory_kwargs": FAKE, "controller_name": CONTROLLER, "cpus_per_rank": 0.5,
                         "deployment_options": {"num_replicas": 2, "max_ongoing_requests": 32,
                                                "health_check_period_s": 1}})
        serve.run(app, name="reliability", route_prefix="/")
        wait_for_fresh_replicas(cluster.base_url, 2)
        yield cluster
    finally:
        cluster.stop()


class Stream:
    """One streamed request read in a thread: status, replica header, `data:` events, and how it ended."""

    def __init__(self, base_url: str, body: dict, disconnect_after_s: float | None = None):
        self.base_url, self.body, self.disconnect_after_s = base_url, body, disconnect_after_s
        self.status: int | None = None
        self.replica: str | None = None
        self.headers: dict = {}
        self.events: list[str] = []
        self.text = ""
        self.transport_error: str | None = None
        self.first_event = threading.Event()

    def run(self) -> Stream:
        started = time.monotonic()
        try:
            with httpx.stream("POST", f"{self.base_url}/v1/completions", json=self.body, timeout=60) as response:
                self.status, self.headers = response.status_code, response.headers
                self.replica = response.headers.get("x-elastic-replica")
                for line in response.iter_lines():
                    self.text += line
                    if line.startswith("data: "):
                        self.events.append(line[len("data: "):])
                        self.first_event.set()
                    if self.disconnect_after_s is not None and time.monotonic() - started > self.disconnect_after_s:
                        return self
        except httpx.HTTPError as exc:
            self.transport_error = repr(exc)
        finally:
            self.first_event.set()
        return self


def idle(base_url: str) -> bool:
    totals = cluster_view(base_url)["totals"]
    return totals["num_running"] == 0 and totals["num_waiting"] == 0 and totals["kv_chunks_used"] == 0


def test_disconnect_storm_leaves_both_replicas_idle(cluster):
    rng = random.Random(15)
    bodies = [{"prompt": f"storm {index}", "max_tokens": 40, "stream": index % 3 != 0} for index in range(60)]
    with ThreadPoolExecutor(8) as pool:
        streams = list(pool.map(lambda body: Stream(cluster.base_url, body, rng.uniform(0.0, 0.6)).run(), bodies))
    assert all(stream.status in (200, 503) or stream.transport_error for stream in streams)
    wait_for(lambda: idle(cluster.base_url), "both replicas at running=0, waiting=0, KV used=0", 30)


def test_overload_is_a_503_with_retry_after_through_the_proxy_then_recovery(cluster):
    body = {"prompt": "busy", "max_tokens": 30}
    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(lambda _: httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60),
                                  range(24)))
    refused = [response for response in responses if response.status_code == 503]
    assert refused and len(refused) < len(responses)
    for response in refused:
        assert response.json()["error"]["code"] == "overloaded"
        assert response.headers["retry-after"] == "2"
        assert response.headers["x-elastic-replica"].startswith("reliability#LLMServer") or \
            response.headers["x-elastic-replica"] != "proxy"
    assert all(response.status_code == 200 for response in responses if response.status_code != 503)
    wait_for(lambda: idle(cluster.base_url), "the replicas to drain their queues", 30)
    assert httpx.post(f"{cluster.base_url}/v1/completions", json=body, timeout=60).status_code == 200


def replica_processes() -> list:
    """The replica actors' processes (Ray titles them `ray::ServeReplica:<app>:LLMServer`)."""
    import psutil

    found = []
    for process in psutil.Process().children(recursive=True):
        try:
            if "ServeReplica:reliability:LLMServer" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_sigkill_of_a_replica_with_streams_in_flight(cluster, record_property):
    streams = [Stream(cluster.base_url, {"prompt": f"long {index}", "max_tokens": 200, "stream": True})
               for index in range(6)]
    pool = ThreadPoolExecutor(len(streams) + 4)
    futures = [pool.submit(stream.run) for stream in streams]
    for stream in streams:
        assert stream.first_event.wait(30)
    waiting = [pool.submit(httpx.post, f"{cluster.base_url}/v1/completions", json={"prompt": f"plain {index}",
                           "max_tokens": 100}, timeout=60) for index in range(4)]
    by_replica: dict[str, list[Stream]] = {}
    for stream in streams:
        by_replica.setdefault(stream.replica, []).append(stream)
    assert len(by_replica) == 2, sorted(by_replica)
    processes = replica_processes()
    assert len(processes) == 2
    killed_at = time.monotonic()
    os.kill(processes[0].pid, signal.SIGKILL)
    for future in futures:
        future.result(timeout=60)
    pool.shutdown()
    # Which replica died shows in how its streams ended; the other's all finished normally.
    cut = {stream.replica for stream in streams if "replica_unavailable" in stream.text}
    assert len(cut) == 1, [stream.text[-300:] for stream in streams]
    (victim,) = cut
    for stream in by_replica[victim]:
        assert stream.transport_error is None, stream.transport_error
        assert stream.events[-1] == "[DONE]"
        error = json.loads(stream.events[-2])["error"]
        assert (error["type"], error["code"]) == ("server_error", "replica_unavailable")
    for replica, survivors in by_replica.items():
        if replica != victim:
            for stream in survivors:
                assert stream.events[-1] == "[DONE]" and "error" not in stream.events[-2]
    # Non-streaming requests on the dead replica: a retryable 503 (they never answered), the rest a 200.
    for future in waiting:
        response = future.result(timeout=60)
        if response.status_code != 200:
            assert response.status_code == 503 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "replica_unavailable"
            assert response.headers["x-elastic-replica"] == "proxy"
    # Serve replaces the replica; until then the survivor serves everything.
    assert httpx.post(f"{cluster.base_url}/v1/completions", json={"prompt": "after", "max_tokens": 2},
                      timeout=30).status_code == 200
    wait_for_fresh_replicas(cluster.base_url, 2, timeout_s=120)
    recovery_s = time.monotonic() - killed_at
    record_property("replica_recovery_s", round(recovery_s, 1))
    print(f"replica replaced {recovery_s:.1f} s after SIGKILL")
