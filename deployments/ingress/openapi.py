"""What /openapi.json says each route answers: the error statuses we return, in OpenAI's error shape, and
the real media types (SSE for streams, Prometheus text for /metrics).

FastAPI documents only 200 and 422 by itself; we never answer 422 (validation errors are OpenAI's 400),
but FastAPI adds it to every route with a body, so it is documented as the same error object.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class ErrorObject(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorObject


def _error(description: str) -> dict[str, Any]:
    return {"model": ErrorResponse, "description": description}


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}}

V1_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: _error("Missing or wrong API key (when the server has one)"),
    404: _error("Unknown route or model"),
    500: _error("Internal error; the message carries a trace id for the server's log"),
    503: {**_error("Overloaded, loading, shutting down or the controller is unavailable"),
          "headers": _RETRY_AFTER},
}

_BODY_ERRORS: dict[int | str, dict[str, Any]] = {
    400: _error("Invalid JSON, schema, text or values (OpenAI's invalid_request_error)"),
    413: _error("The request body is larger than the server's max_body_bytes"),
    422: _error("Never sent (validation errors are 400); listed because FastAPI documents it"),
}

GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_BODY_ERRORS,
    200: {"description": "A JSON completion, or with `stream: true` server-sent events ending in `data: [DONE]`",
          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
}

ADMIN_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_BODY_ERRORS,
    403: _error("Admin endpoints need an api_key in the server's configuration"),
}

METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Prometheus text exposition of this replica's elastic:* series",
          "content": {"text/plain": {"schema": {"type": "string"}}}},
}
