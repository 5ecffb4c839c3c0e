"""ProxyGuard, the middleware Serve's proxy runs: what a client sees when a replica dies or the proxy answers
itself. The inner apps replay what Ray Serve 2.60's proxy sends in each case (see proxy_guard.py)."""

from __future__ import annotations

import asyncio
import json

from deployments.ingress.proxy_guard import ProxyGuard, proxy_middlewares

SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-elastic-replica", b"r1")]


def call(app) -> list[dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    asyncio.run(ProxyGuard(app)(scope, receive, send))
    return sent


def body_of(sent: list[dict]) -> bytes:
    return b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")


def assert_replica_gone(sent: list[dict]) -> None:
    assert sent[0]["status"] == 503
    headers = dict(sent[0]["headers"])
    assert headers[b"retry-after"] == b"1" and headers[b"content-type"] == b"application/json"
    assert headers[b"x-elastic-replica"] == b"proxy"
    assert json.loads(body_of(sent)) == {"error": {
        "message": "The replica serving this request stopped before answering; retry the request.",
        "type": "server_error", "param": None, "code": "replica_unavailable"}}
    assert sent[-1].get("more_body", False) is False


def test_no_response_because_the_replica_died_becomes_a_retryable_503():
    async def replica_died_before_answering(scope, receive, send):
        return  # Serve's proxy yields no message when the replica's actor died (status 500, nothing sent)

    assert_replica_gone(call(replica_died_before_answering))


def test_a_proxy_plain_text_500_becomes_a_retryable_503():
    async def plain_500(scope, receive, send):
        await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"Internal Server Error", "more_body": False})

    assert_replica_gone(call(plain_500))


def test_a_stream_cut_by_a_dying_replica_ends_with_an_error_event_and_done():
    async def stream_then_death(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": SSE})
        await send({"type": "http.response.body", "body": b'data: {"choices": []}\n\n', "more_body": True})
        raise RuntimeError("ActorDiedError")  # or a plain return: both leave the body unfinished

    sent = call(stream_then_death)
    assert sent[0]["status"] == 200
    events = [block for block in body_of(sent).decode().split("\n\n") if block]
    assert events[0] == 'data: {"choices": []}'
    assert json.loads(events[1][len("data: "):])["error"]["code"] == "replica_unavailable"
    assert events[2] == "data: [DONE]"
    assert sent[-1]["more_body"] is False


def test_proxy_timeouts_keep_their_status_in_openai_shape():
    async def timeout(scope, receive, send):
        await send({"type": "http.response.start", "status": 408,
                    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"30")]})
        await send({"type": "http.response.body", "body": b"Request abc timed out after 5s", "more_body": False})

    sent = call(timeout)
    assert sent[0]["status"] == 408
    assert json.loads(body_of(sent))["error"] == {"message": "Request abc timed out after 5s",
                                                  "type": "invalid_request_error", "param": None, "code": "timeout"}


def test_replica_responses_pass_untouched():
    messages = [{"type": "http.response.start", "status": 500,
                 "headers": [(b"content-type", b"application/json"), (b"x-elastic-replica", b"r1")]},
                {"type": "http.response.body", "body": b'{"error": {}}', "more_body": False}]

    async def replica_500(scope, receive, send):
        for message in messages:
            await send(message)

    assert call(replica_500) == messages


def test_serve_gets_a_list_of_starlette_middlewares():
    from starlette.middleware import Middleware

    (middleware,) = proxy_middlewares()
    assert isinstance(middleware, Middleware) and middleware.cls is ProxyGuard
