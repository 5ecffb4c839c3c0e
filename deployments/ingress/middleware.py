"""The ASGI layers around the OpenAI app, outermost first: `ResponseGuard`, `ApiKeyGuard`, `BodyLimit`.

- `ResponseGuard` is the one error path: it tags every response with the replica that served it, counts
  error statuses, and turns any exception that escaped the app into an OpenAI-shaped 500 carrying a trace
  id (the traceback goes to the log only). An exception after a stream started ends the stream with an
  error event and `[DONE]`. Plain ASGI (not BaseHTTPMiddleware) so streaming bodies and disconnect
  cancellation pass through untouched.
- `ApiKeyGuard`: `Authorization: Bearer <key>` on /v1/*, checked before the body is read.
- `BodyLimit` reads the whole body itself, refusing it with 413 as soon as it passes the limit (from
  Content-Length before reading anything, else while counting), and with 400 when it is not UTF-8; then
  replays it to the app, whose later `receive()` calls (disconnect detection) reach the real channel.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from deployments.ingress import errors

REPLICA_HEADER = "x-elastic-replica"
SSE_MEDIA_TYPE = b"text/event-stream"


def _route_path(scope) -> str:
    """The path the app routes on: under a Serve route_prefix, `path` still starts with `root_path`."""
    path, root_path = scope["path"], scope.get("root_path", "")
    return path[len(root_path):] if root_path and path.startswith(root_path) else path


class ResponseGuard:
    def __init__(self, app, replica_id: str, on_status: Callable[[int], None]):
        self._app = app
        self._header = (REPLICA_HEADER.encode(), replica_id.encode())
        self._on_status = on_status

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        state = {"started": False, "finished": False, "sse": False}

        async def send_tagged(message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), self._header]
                message = {**message, "headers": headers}
                state["started"] = True
                state["sse"] = any(name.lower() == b"content-type" and value.startswith(SSE_MEDIA_TYPE)
                                   for name, value in headers)
                self._on_status(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["finished"] = True
            await send(message)

        try:
            await self._app(scope, receive, send_tagged)
        except Exception as exc:  # noqa: BLE001 - the one place an unexpected error becomes a response
            trace_id = errors.log_internal(f"{scope.get('method')} {_route_path(scope)} failed", exc)
            error = errors.internal_error(trace_id)
            if not state["started"]:
                await error.response()(scope, receive, send_tagged)
            elif not state["finished"]:
                self._on_status(error.status)  # counted: the 200 already went out
                body = errors.sse_error_events(error).encode() if state["sse"] else b""
                await send({"type": "http.response.body", "body": body, "more_body": False})


class ApiKeyGuard:
    """A caller without the key learns nothing about what the body should be."""

    def __init__(self, app, api_key: str):
        self._app = app
        self._api_key = api_key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and _route_path(scope).startswith("/v1/"):
            error = self._check(dict(scope["headers"]).get(b"authorization", b""))
            if error is not None:
                await error.response()(scope, receive, send)
                return
        await self._app(scope, receive, send)

    def _check(self, header: bytes) -> errors.APIError | None:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return errors.invalid_api_key(has_key=False)
        if not hmac.compare_digest(token, self._api_key):
            return errors.invalid_api_key(has_key=True)
        return None


class BodyLimit:
    def __init__(self, app, max_body_bytes: int):
        self._app = app
        self._limit = max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self._app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self._limit:
            await errors.payload_too_large(self._limit).response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left while sending: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self._limit:
                await errors.payload_too_large(self._limit).response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            error = errors.invalid_request(f"The request body is not valid UTF-8 (at byte {exc.start}).",
                                           None, "invalid_encoding")
            await error.response()(scope, receive, send)
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self._app(scope, replay, send)
