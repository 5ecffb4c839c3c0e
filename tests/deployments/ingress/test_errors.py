"""Every error the HTTP layer reports: status, headers and the exact OpenAI error object."""

from __future__ import annotations

import json
import re

import pytest
from fastapi.testclient import TestClient

from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.openai_app import AppSettings, build_openai_app
from tests.deployments.conftest import sse_events
from tests.deployments.fake_engine import FakeEngine

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


def error(message, type="invalid_request_error", param=None, code=None):
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def assert_error(response, status, type="invalid_request_error", param=None, code=None):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert (body["error"]["type"], body["error"]["param"], body["error"]["code"]) == (type, param, code)
    return body["error"]["message"]


def test_malformed_json_is_400(client):
    response = client.post("/v1/chat/completions", content=b'{"messages": [',
                           headers={"content-type": "application/json"})
    message = assert_error(response, 400)
    assert message.startswith("Malformed JSON body")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"max_tokens": 3}, "messages"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages.0.content"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, None),
    ("/v1/chat/completions", {**CHAT, "n": 0}, "n"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
    ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
])
def test_schema_errors_are_400_with_the_field_named(client, engine, path, body, param):
    assert_error(client.post(path, json=body), 400, param=param)
    assert engine.submitted == []


def test_a_json_array_body_is_400(client):
    assert_error(client.post("/v1/completions", json=[1, 2]), 400)


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("max_tokens", 0),
                                          ("top_k", -5), ("presence_penalty", 3), ("min_tokens", 100)])
def test_engine_sampling_validation_is_400_with_the_field_named(client, engine, field, value):
    body = {"prompt": "x", "max_tokens": 8, field: value}
    message = assert_error(client.post("/v1/completions", json=body), 400, param=field)
    assert field in message
    assert engine.submitted == []


def test_prompt_too_long_is_400_context_length_exceeded(client, engine):
    message = assert_error(client.post("/v1/completions", json={"prompt": "x" * 250, "max_tokens": 10}), 400,
                           param="prompt", code="context_length_exceeded")
    assert "256" in message and "261" in message
    long_chat = {"messages": [{"role": "user", "content": "y" * 300}]}
    assert_error(client.post("/v1/chat/completions", json=long_chat), 400, param="messages",
                 code="context_length_exceeded")
    assert engine.submitted == []


def test_token_ids_outside_the_vocabulary_are_400(client):
    assert_error(client.post("/v1/completions", json={"prompt": [5, 100000]}), 400, param="prompt")


def test_unknown_model_is_404(client):
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "gpt-17"})
    assert response.status_code == 404
    assert response.json() == error("The model `gpt-17` does not exist.", param="model",
                                    code="model_not_found")


def test_unknown_route_is_openai_shaped_404(client):
    assert_error(client.get("/v1/nothing-here"), 404, code="not_found")


def test_api_key_when_configured(make_client, engine):
    client = make_client(engine, api_key="sesame")
    missing = client.post("/v1/chat/completions", json=CHAT)
    assert_error(missing, 401, code="invalid_api_key")
    wrong = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert wrong.json() == error("Incorrect API key provided.", code="invalid_api_key")
    assert wrong.status_code == 401
    # The key is checked before the body: a bad body without a key is still 401.
    assert client.post("/v1/completions", content=b"{", headers={"content-type": "application/json"}
                       ).status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    good = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sesame"})
    assert good.status_code == 200
    assert len(engine.submitted) == 1


def test_api_key_is_checked_under_a_route_prefix(engine):
    # What a Serve route_prefix does: `path` keeps the prefix and `root_path` names it.
    app = build_openai_app(lambda: engine, AppSettings(api_key="sesame", bindings=EngineBindings.from_engine_package()))
    with TestClient(app, root_path="/tp") as client:
        assert client.get("/tp/v1/models").status_code == 401
        assert client.get("/tp/v1/models", headers={"Authorization": "Bearer sesame"}).status_code == 200


def test_overloaded_engine_is_503_with_retry_after(make_client):
    engine = FakeEngine(max_num_waiting=0)
    response = make_client(engine).post("/v1/chat/completions", json=CHAT)
    assert_error(response, 503, type="server_error", code="overloaded")
    assert response.headers["retry-after"] == "2"


def test_overloaded_stream_is_503_before_streaming(make_client):
    engine = FakeEngine(max_num_waiting=0)
    response = make_client(engine).post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert_error(response, 503, type="server_error", code="overloaded")


def test_dead_engine_is_500(make_client):
    engine = FakeEngine(is_dead=True)
    assert_error(make_client(engine).post("/v1/completions", json={"prompt": "x"}), 500, type="server_error",
                 code="engine_dead")


def trace_id_of(message: str) -> str:
    match = re.fullmatch(r".*\(trace id ([0-9a-f]{16})\)\.", message)
    assert match, message
    return match.group(1)


def test_engine_failure_mid_stream_is_an_error_event_then_done(client, engine, caplog):
    response = client.post("/v1/completions", json={"prompt": "please FAIL", "max_tokens": 8, "stream": True})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert len(events) == 4  # two tokens, the error, [DONE]
    assert events[-1] == "[DONE]"
    body = json.loads(events[-2])
    assert body["error"]["type"] == "server_error" and body["error"]["code"] == "internal_error"
    trace_id = trace_id_of(body["error"]["message"])
    assert "fake engine failure" not in events[-2]  # the engine's message goes to the log only
    assert any(trace_id in record.getMessage() and "fake engine failure" in record.getMessage()
               for record in caplog.records)


def test_engine_failure_without_stream_is_500_with_a_trace_id(client):
    response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "FAIL"}]})
    message = assert_error(response, 500, type="server_error", code="internal_error")
    trace_id_of(message)
    assert response.headers["x-elastic-replica"] == "replica-under-test"


def test_the_server_keeps_serving_after_errors(client):
    client.post("/v1/completions", content=b"nope", headers={"content-type": "application/json"})
    client.post("/v1/completions", json={"prompt": "FAIL", "stream": True})
    client.post("/v1/completions", json={"prompt": "x", "temperature": -3})
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_unexpected_failures_are_openai_shaped_500(make_client, engine):
    async def broken_cluster_view():
        raise RuntimeError("controller gone")

    client = make_client(engine, cluster_view=broken_cluster_view)
    assert_error(client.get("/v1/cluster"), 503, type="server_error", code="controller_unavailable")
    engine.memory_telemetry = lambda: 1 / 0
    response = client.get("/v1/memory")
    message = assert_error(response, 500, type="server_error", code="internal_error")
    assert "ZeroDivision" not in message and "division" not in message
    trace_id_of(message)
    assert response.headers["x-elastic-replica"] == "replica-under-test"
