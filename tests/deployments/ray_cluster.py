"""A throwaway local Ray cluster on 127.0.0.1 for one test module, and the check that it left nothing.

Ray gets its own temp dir (a stale /tmp/ray/ray_current_cluster makes Serve hang) and a PYTHONPATH that
includes the repository, so replicas can import tests.deployments.fake_engine.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Serve's proxies run deployments/ingress/proxy_guard.py, as under `python -m deployments.launch`.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "deployments.ingress.proxy_guard:proxy_middlewares")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalRayCluster:
    def __init__(self, num_cpus: int = 2):
        self.num_cpus = num_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Unix socket paths are limited
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self._process_ids: set[int] = set()
        self.is_running = False

    def start(self) -> None:
        import ray
        from ray import serve

        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        ray.init(address="local", num_cpus=self.num_cpus, include_dashboard=False, _temp_dir=self.temp_dir,
                 _node_ip_address="127.0.0.1", runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
                 log_to_driver=False)
        self.is_running = True
        serve.start(http_options={"host": "127.0.0.1", "port": self.port})

    def remember_processes(self) -> None:
        self._process_ids |= {child.pid for child in psutil.Process().children(recursive=True)}

    def stop(self) -> None:
        if not self.is_running:
            return
        import ray
        from ray import serve

        self.remember_processes()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.is_running = False
            if os.environ.get("ELASTIC_SERVE_KEEP_RAY_TEMP"):  # to read the replicas' logs after a failure
                print(f"Ray's temp dir (logs) kept: {self.temp_dir}")
            else:
                shutil.rmtree(self.temp_dir, ignore_errors=True)

    def leftover_processes(self, timeout_s: float = 20.0) -> list[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            alive = []
            for pid in sorted(self._process_ids):
                try:
                    process = psutil.Process(pid)
                    if process.status() != psutil.STATUS_ZOMBIE:
                        alive.append(f"{pid} {' '.join(process.cmdline())[:120]}")
                except psutil.NoSuchProcess:
                    pass
            if not alive or time.monotonic() > deadline:
                return alive
            time.sleep(0.2)
