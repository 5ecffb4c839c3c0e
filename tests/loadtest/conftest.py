"""Fixtures of the load-test tests.

`openai_server` is the server the smoke tests load: for now the fake in fake_openai_server.py (fixed token
timing); it can be swapped for the real app as long as it still yields a base URL on 127.0.0.1.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests


@pytest.fixture(scope="session")
def openai_server():
    with socket.socket() as probe:  # a free port; the tiny race until the server binds it is acceptable here
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Path(__file__).with_name("fake_openai_server.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--ttft-ms", "20", "--itl-ms", "4"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(base_url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fake server did not start: {process.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
