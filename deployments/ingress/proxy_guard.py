"""`ProxyGuard`: an ASGI middleware for Ray Serve's HTTP proxy, so clients see clean endings when a replica
dies or the proxy itself answers.

Ray Serve 2.60's proxy, when the replica handling a request dies (SIGKILL, OOM, node loss):
- before the response started: sends no response at all, and uvicorn answers a plain-text
  `500 Internal Server Error`;
- after a stream started: stops sending, and the client sees the connection closed mid-body ("peer closed
  connection without sending complete message body"), with no error event and no `[DONE]`.
Its own refusals (408 timeout, 503 back-pressure) are plain text too. The replica cannot help (it is
gone), so this guard runs in the proxy: Serve installs it from the import path in the environment variable
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=deployments.ingress.proxy_guard:proxy_middlewares` (set by
`python -m deployments.launch` and by the tests' cluster). It only ever touches responses that did not
come from a replica (no `x-elastic-replica` header) and streams that ended without their last body part:
- no response, or a proxy 500 -> OpenAI-shaped `503 replica_unavailable` with `Retry-After: 1` (the
  request did not run to completion anywhere; retrying reaches a live replica);
- any other proxy error status -> the same status and headers, with the text as an OpenAI error message;
- an SSE stream cut short -> `data: {"error": {... "code": "replica_unavailable"}}` then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import logging

from starlette.middleware import Middleware

from deployments.ingress import errors
from deployments.ingress.middleware import REPLICA_HEADER, SSE_MEDIA_TYPE

logger = logging.getLogger(__name__)
CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "deployments.ingress.proxy_guard:proxy_middlewares"
PROXY_MARK = (REPLICA_HEADER.encode(), b"proxy")


def _error_body(message: str, code: str | None, type: str = "server_error") -> bytes:
    return json.dumps(errors.APIError(0, message, type, None, code).body()).encode()


REPLICA_GONE = ("The replica serving this request stopped before answering; retry the request.",
                "replica_unavailable")
STREAM_CUT = "data: " + _error_body("The replica serving this stream stopped; the output is incomplete.",
                                    "replica_unavailable").decode() + "\n\ndata: [DONE]\n\n"


class ProxyGuard:
    def __init__(self, app):
        self._app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        state = {"started": False, "finished": False, "sse": False, "held": None, "held_body": b""}

        async def guarded_send(message) -> None:
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                names = {name.lower() for name, _ in headers}
                if REPLICA_HEADER.encode() not in names and message["status"] >= 400:
                    state["held"] = message  # a proxy error: rewritten once its body is complete
                    return
                state["started"] = True
                state["sse"] = any(name.lower() == b"content-type" and value.startswith(SSE_MEDIA_TYPE)
                                   for name, value in headers)
            elif message["type"] == "http.response.body" and state["held"] is not None:
                state["held_body"] += message.get("body", b"")
                if not message.get("more_body", False):
                    await self._send_proxy_error(send, state["held"], state["held_body"])
                    state["started"] = state["finished"] = True
                return
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        try:
            await self._app(scope, receive, guarded_send)
        except asyncio.CancelledError:
            raise  # the client left: nobody to answer
        except Exception:  # noqa: BLE001 - answered below like any other lost response
            logger.exception("the proxy failed a request")
        if not state["started"]:
            await self._send(send, 503, _error_body(*REPLICA_GONE), [(b"retry-after", b"1")])
        elif not state["finished"]:
            body = STREAM_CUT.encode() if state["sse"] else b""
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def _send_proxy_error(self, send, start, body: bytes) -> None:
        status = start["status"]
        if status == 500:
            await self._send(send, 503, _error_body(*REPLICA_GONE), [(b"retry-after", b"1")])
            return
        kept = [(name, value) for name, value in start.get("headers", [])
                if name.lower() not in (b"content-type", b"content-length")]
        message = body.decode("utf-8", "replace").strip() or f"HTTP {status}"
        error_type = "invalid_request_error" if status < 500 else "server_error"
        code = {408: "timeout", 503: "overloaded", 404: "not_found"}.get(status)
        await self._send(send, status, _error_body(message, code, error_type), kept)

    @staticmethod
    async def _send(send, status: int, body: bytes, headers: list) -> None:
        headers = [*headers, (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), PROXY_MARK]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def proxy_middlewares() -> list[Middleware]:
    """What Serve's proxy calls (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH)."""
    return [Middleware(ProxyGuard)]
