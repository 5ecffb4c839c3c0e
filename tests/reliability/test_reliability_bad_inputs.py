"""Bad inputs: every one is an OpenAI-shaped 4xx naming the field, with the replica header, counted in
elastic:http_request_errors, and nothing reaches the engine. (Issue 15, failures 1, 2 and 7.)"""

from __future__ import annotations

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from deployments.ingress import errors
from tests.deployments.fake_engine import FakeEngine
from tests.reliability.conftest import REPLICA, assert_openai_error, error_counts, make_app, trace_id_of

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
SURROGATE = '"\\ud800"'  # JSON text: a lone high surrogate, which json.loads turns into an unencodable str


def raw(template: str) -> str:
    """A JSON body with the surrogate where the template has @."""
    return template.replace("@", SURROGATE)


def chat_with(**fields) -> dict:
    return {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


# (path, raw JSON body, status, param, code)
RAW_CASES = [
    (COMPLETIONS, raw('{"prompt": @}'), 400, "prompt", "invalid_encoding"),
    (COMPLETIONS, raw('{"prompt": @, "stream": true}'), 400, "prompt", "invalid_encoding"),
    (COMPLETIONS, '{"prompt": ["a\\ud800"]}', 400, "prompt.0", "invalid_encoding"),
    (CHAT, raw('{"messages": [{"role": "user", "content": @}]}'), 400, "messages.0.content",
     "invalid_encoding"),
    (CHAT, raw('{"messages": [{"role": "user", "content": [{"type": "text", "text": @}]}], "stream": true}'),
     400, "messages.0.content.0.text", "invalid_encoding"),
    (CHAT, raw('{"messages": [{"role": "user", "content": "x", "name": @}]}'), 400, "messages.0.name",
     "invalid_encoding"),
    (COMPLETIONS, raw('{"prompt": "x", "stop": [@]}'), 400, "stop.0", "invalid_encoding"),
    (COMPLETIONS, raw('{"prompt": "x", "model": @}'), 400, "model", "invalid_encoding"),
    (COMPLETIONS, raw('{"prompt": "x", "user": @}'), 400, "user", "invalid_encoding"),
    (COMPLETIONS, raw('{"prompt": "x", @: 1}'), 400, None, "invalid_encoding"),
]

# (path, JSON body, param): schema and range errors, each a 400 naming the field
VALUE_CASES = [
    (COMPLETIONS, {"prompt": "x", "temperature": 1e9}, "temperature"),
    (COMPLETIONS, {"prompt": "x", "temperature": -0.5}, "temperature"),
    (CHAT, chat_with(temperature=2.5), "temperature"),
    (COMPLETIONS, {"prompt": "x", "stop": ["s"] * 1000}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": "s" * 1_000_000}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [10**9]}, "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids"),
    (CHAT, chat_with(stop_token_ids=[5] * 1000), "stop_token_ids"),
    (COMPLETIONS, {"prompt": "x", "logprobs": True}, "logprobs"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, "logprobs"),
    (CHAT, chat_with(logprobs=True, top_logprobs=21), "top_logprobs"),
    (CHAT, chat_with(logprobs="yes"), "logprobs"),
    (COMPLETIONS, {"prompt": "x", "stream": "yes"}, "stream"),
    (CHAT, chat_with(stream=1), "stream"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, None),
    (CHAT, chat_with(stream=False, stream_options={"include_usage": True}), None),
    (CHAT, chat_with(stream=True, stream_options={"include_usage": "yes"}), "stream_options.include_usage"),
    (COMPLETIONS, {"prompt": "x", "n": 1000}, "n"),
    (COMPLETIONS, {"prompt": "x", "n": -1}, "n"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, "seed"),
    (COMPLETIONS, {"prompt": "x", "echo": "no"}, "echo"),
    (COMPLETIONS, {"prompt": "x", "ignore_eos": "true"}, "ignore_eos"),
    (COMPLETIONS, {"prompt": 5}, "prompt"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": -3}, "max_tokens"),
    (COMPLETIONS, {"prompt": "x", "top_p": 7}, "top_p"),
    (COMPLETIONS, {"prompt": "x", "frequency_penalty": -9}, "frequency_penalty"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
    (CHAT, chat_with(n=1.5), "n"),
]


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(make_app(engine), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize("path, raw, status, param, code", RAW_CASES)
def test_lone_surrogates_are_400_naming_the_field(client, engine, path, raw, status, param, code):
    response = client.post(path, content=raw.encode(), headers={"content-type": "application/json"})
    assert_openai_error(response, status, param, code)
    assert response.headers["x-elastic-replica"] == REPLICA
    assert engine.submitted == []


@pytest.mark.parametrize("path, body, param", VALUE_CASES)
def test_out_of_range_and_wrong_types_are_400_naming_the_field(client, engine, path, body, param):
    response = client.post(path, json=body)
    assert_openai_error(response, 400, param, None)
    assert response.headers["x-elastic-replica"] == REPLICA
    assert engine.submitted == []


def test_invalid_utf8_is_400(client, engine):
    response = client.post(COMPLETIONS, content=b'{"prompt": "\xff\xfe"}', headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400, None, "invalid_encoding")
    assert error["message"] == "The request body is not valid UTF-8 (at byte 12)."
    assert engine.submitted == []


def test_model_not_found_renders_any_name():
    response = errors.model_not_found("\ud800" + "m" * 1000).response()
    body = json.loads(response.body)
    assert body["error"]["message"] == "The model `\\ud800" + "m" * 255 + "...` does not exist."
    assert body["error"]["code"] == "model_not_found"


def test_errors_are_counted_by_status_500_included(engine):
    with TestClient(make_app(engine), raise_server_exceptions=False) as client:
        client.post(COMPLETIONS, content=raw('{"prompt": @}').encode(),
                    headers={"content-type": "application/json"})
        client.post(COMPLETIONS, json={"prompt": "x", "model": "nope"})
        engine.memory_telemetry = lambda: 1 / 0  # an unexpected failure inside a route
        response = client.get("/v1/memory")
        error = assert_openai_error(response, 500, None, "internal_error")
        trace_id_of(error["message"])
        assert response.headers["x-elastic-replica"] == REPLICA
        assert error_counts(client.get("/metrics").text) == {"400": 1.0, "404": 1.0, "500": 1.0}


def test_the_body_limit_applies_while_reading():
    """A body over the limit is refused after reading just past the limit, not after reading it all."""
    app = make_app(FakeEngine(), max_body_bytes=1000)
    chunks = [b'{"prompt": "' + b"x" * 400] + [b"x" * 400] * 100 + [b'"}']
    sent = []

    async def call():
        consumed = 0

        async def receive():
            nonlocal consumed
            consumed += 1
            return {"type": "http.request", "body": chunks[consumed - 1], "more_body": consumed < len(chunks)}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": COMPLETIONS, "raw_path": COMPLETIONS.encode(),
                 "root_path": "", "query_string": b"", "headers": [(b"content-type", b"application/json")],
                 "http_version": "1.1", "scheme": "http", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
                 "asgi": {"version": "3.0"}}
        await app(scope, receive, send)
        return consumed

    consumed = asyncio.run(call())
    assert consumed == 3  # 400 + 400 + 400 bytes: the third chunk passes 1000
    assert sent[0]["status"] == 413
    assert (b"x-elastic-replica", REPLICA.encode()) in sent[0]["headers"]
    body = json.loads(sent[1]["body"])
    assert body == {"error": {"message": "The request body is larger than this server's limit of 1000 bytes.",
                              "type": "invalid_request_error", "param": None, "code": "request_too_large"}}


def test_a_declared_oversized_body_is_413_before_reading(engine):
    with TestClient(make_app(engine, max_body_bytes=1000), raise_server_exceptions=False) as client:
        response = client.post(COMPLETIONS, json={"prompt": "x" * 5000})
        assert_openai_error(response, 413, None, "request_too_large")
        assert response.headers["x-elastic-replica"] == REPLICA
        assert client.post(COMPLETIONS, json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert len(engine.submitted) == 1


def test_a_prompt_longer_than_the_context_can_hold_is_400_without_tokenising(engine):
    calls = []
    from deployments.ingress.engine_bindings import EngineBindings

    bindings = EngineBindings.from_engine_package()
    def encode_prompt(tokenizer, text):
        calls.append(len(text))
        return bindings.encode_prompt(tokenizer, text)

    counting = EngineBindings(bindings.sampling_params_cls, encode_prompt, bindings.encode_chat)
    with TestClient(make_app(engine, bindings=counting), raise_server_exceptions=False) as client:
        # The fake's longest vocabulary entry is "<pad>" (5 characters): 256 tokens hold at most 1280.
        response = client.post(COMPLETIONS, json={"prompt": "y" * 1281, "max_tokens": 1})
        assert_openai_error(response, 400, "prompt", "context_length_exceeded")
        response = client.post(CHAT, json={"messages": [{"role": "user", "content": "y" * 1281}]})
        assert_openai_error(response, 400, "messages", "context_length_exceeded")
    assert calls == []


def test_deeply_nested_bodies_are_400_not_500(client, engine):
    deep = "[" * 900 + "]" * 900
    response = client.post(COMPLETIONS, content=('{"prompt": "x", "user": ' + deep + "}").encode(),
                           headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "user", None)
    surrogate_deep = '{"prompt": "x", "extra": ' + "[" * 500 + SURROGATE + "]" * 500 + "}"
    response = client.post(COMPLETIONS, content=surrogate_deep.encode(), headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "extra" + ".0" * 500, "invalid_encoding")
    assert engine.submitted == []
