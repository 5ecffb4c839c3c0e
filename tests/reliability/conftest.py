"""Shared pieces of the reliability suite: the OpenAI app around a fake engine, and error assertions."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.openai_app import AppSettings, build_openai_app

REPLICA = "replica-under-test"


def make_app(engine, **settings):
    settings.setdefault("bindings", EngineBindings.from_engine_package())
    settings.setdefault("replica_id", REPLICA)
    return build_openai_app(lambda: engine, AppSettings(**settings))


def assert_openai_error(response, status: int, param=None, code=None, type=None) -> dict:
    """The exact OpenAI error shape, the replica header, and (when given) param/code/type."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == (type or ("invalid_request_error" if status < 500 else "server_error"))
    assert (error["param"], error["code"]) == (param, code), error
    return error


def trace_id_of(message: str) -> str:
    match = re.fullmatch(r".*\(trace id ([0-9a-f]{16})\)\.", message)
    assert match, message
    return match.group(1)


def error_counts(metrics_text: str) -> dict[str, float]:
    """elastic:http_request_errors by status, from one /metrics body."""
    counts = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "elastic:http_request_errors_total":
                counts[sample.labels["status"]] = sample.value
    return counts


class AsgiRequest:
    """One HTTP request driven by hand over ASGI (httpx's ASGITransport buffers whole responses, so it
    cannot show a stream in progress): `events` fills as the app sends; `disconnect()` is the client leaving."""

    def __init__(self, app, path: str, body: dict, method: str = "POST"):
        import asyncio
        import json

        self.app = app
        self.body = json.dumps(body).encode()
        self.scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": b"", "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
        }
        self._gone = asyncio.Event()
        self._body_sent = False
        self.status: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.data = b""
        self.is_complete = False

    @property
    def events(self) -> list[str]:
        return [block[len("data: "):] for block in self.data.decode().split("\n\n") if block.startswith("data: ")]

    def disconnect(self) -> None:
        self._gone.set()

    async def receive(self):
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = dict(message.get("headers", []))
        elif message["type"] == "http.response.body":
            self.data += message.get("body", b"")
            self.is_complete = not message.get("more_body", False)

    async def run(self):
        await self.app(self.scope, self.receive, self.send)
