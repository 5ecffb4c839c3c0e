"""SIGINT to `python -m deployments.launch` with streams in flight (slow): new requests get 503
`shutting_down` with Retry-After, streams that finish within graceful_shutdown_timeout_s end normally, the
ones that cannot end with an `aborted` error event and `[DONE]`, then the launcher exits. (Issue 15,
failure 5: `serve run` cut every stream within 0.3 s.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.deployments.ray_cluster import REPO, free_port
from tests.deployments.serve_helpers import wait_for
from tests.reliability.test_reliability_serve import Stream

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
GRACE_S = 8.0
CONFIG = """
proxy_location: HeadOnly
http_options: {{host: 127.0.0.1, port: {port}}}
applications:
  - name: shutdown-test
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      engine_factory: tests.deployments.fake_engine:create_fake_engine
      engine_factory_kwargs: {{token_delay_s: 0.05, max_model_len: 4096}}
      controller_name: shutdown-test-controller
      cpus_per_rank: 0.5
    deployments:
      - name: LLMServer
        num_replicas: 2
        graceful_shutdown_timeout_s: {grace}
"""


def test_sigint_drains_then_stops(tmp_path: Path):
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(port=port, grace=GRACE_S))
    ray_tmp = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "RAY_TMPDIR": ray_tmp, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "launch.log", "w+")
    launcher = subprocess.Popen([sys.executable, "-m", "deployments.launch", str(config), "--address", "local",
                                 "--num-cpus", "2"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        def ready():
            try:
                return httpx.get(f"{base_url}/v1/models", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, "the launcher's app to answer", 180, 1.0)
        short = [Stream(base_url, {"prompt": f"short {index}", "max_tokens": 40, "stream": True}) for index in range(3)]
        long = [Stream(base_url, {"prompt": f"long {index}", "max_tokens": 1000, "stream": True}) for index in range(2)]
        pool = ThreadPoolExecutor(len(short) + len(long))
        futures = [pool.submit(stream.run) for stream in short + long]
        for stream in short + long:
            assert stream.first_event.wait(30)
        signalled_at = time.monotonic()
        launcher.send_signal(signal.SIGINT)
        time.sleep(2.0)  # the drain order reaches the replicas with their next report (0.5 s)
        refused = httpx.post(f"{base_url}/v1/completions", json={"prompt": "late", "max_tokens": 2}, timeout=10)
        for future in futures:
            future.result(timeout=60)
        ended_s = time.monotonic() - signalled_at
        pool.shutdown()
        assert launcher.wait(timeout=90) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.seek(0)
        output = log.read()
        log.close()
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "shutting_down" and refused.headers["retry-after"] == "1"
    for stream in short:
        assert stream.transport_error is None and stream.events[-1] == "[DONE]", stream.text[-300:]
        assert json.loads(stream.events[-2])["choices"][0]["finish_reason"] == "length"
    for stream in long:
        assert stream.transport_error is None and stream.events[-1] == "[DONE]", stream.text[-300:]
        assert json.loads(stream.events[-2])["error"]["code"] == "aborted"
    assert GRACE_S - 3 < ended_s < GRACE_S + 2, ended_s
    assert "drain" in output, output[-2000:]
