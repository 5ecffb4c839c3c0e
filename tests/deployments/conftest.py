from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.openai_app import AppSettings, build_openai_app
from tests.deployments.fake_engine import FakeEngine


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def make_client():
    """make_client(engine, **AppSettings fields) -> TestClient over the OpenAI app."""
    clients = []

    def make(engine: FakeEngine, **settings) -> TestClient:
        settings.setdefault("bindings", EngineBindings.from_engine_package())
        settings.setdefault("replica_id", "replica-under-test")
        app = build_openai_app(lambda: engine, AppSettings(**settings))
        client = TestClient(app, raise_server_exceptions=False)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


@pytest.fixture
def client(engine, make_client) -> TestClient:
    return make_client(engine)


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (the raw string, e.g. '[DONE]' or JSON)."""
    events = []
    for block in body.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events


def sse_json(body: str) -> list[dict]:
    return [json.loads(event) for event in sse_events(body) if event != "[DONE]"]


def pytest_configure(config):
    # Ray Serve's own pydantic models warn at import; nothing we can act on.
    config.addinivalue_line("filterwarnings", "ignore:Using extra keyword arguments on `Field`")
