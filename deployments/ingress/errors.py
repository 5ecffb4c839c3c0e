"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

Every failure the HTTP layer reports goes through `APIError`, so the body shape is decided in one place;
engine errors are translated by `from_engine_error`. Inside a stream the same object is sent as one SSE
`data:` event followed by `data: [DONE]` (`sse_error_events`) because the status line has already gone out.
Anything unexpected becomes `internal_error(trace_id)`: the client gets the trace id, the log gets the
traceback; no exception text (paths, pids, remote tracebacks) reaches a client.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.api import EngineDeadError, EngineOverloadedError, InvalidRequestError

logger = logging.getLogger(__name__)


def printable(text: str) -> str:
    """`text` as valid UTF-8 (lone surrogates escaped), so rendering an error can never fail on it."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        message = printable(message)
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = printable(param) if param is not None else None
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def context_length_exceeded(max_model_len: int, num_prompt_tokens: int, max_tokens: int | None,
                            param: str) -> APIError:
    if max_tokens is None:
        detail = f"your prompt has {num_prompt_tokens} tokens"
    else:
        detail = (f"you requested {num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the "
                  f"{param}, {max_tokens} in the completion)")
    return invalid_request(f"This model's maximum context length is {max_model_len} tokens. However, "
                           f"{detail}. Please reduce the length of the {param} or completion.",
                           param, "context_length_exceeded")


def model_not_found(model: str) -> APIError:
    shown = model if len(model) <= 256 else model[:256] + "..."
    return APIError(404, f"The model `{shown}` does not exist.", "invalid_request_error", "model",
                    "model_not_found")


def invalid_api_key(has_key: bool) -> APIError:
    message = ("Incorrect API key provided." if has_key else
               "Missing API key: send it as 'Authorization: Bearer <key>'.")
    return APIError(401, message, "invalid_request_error", None, "invalid_api_key")


def overloaded(message: str, retry_after_s: float) -> APIError:
    retry_after = str(max(1, math.ceil(retry_after_s)))
    return APIError(503, message, "server_error", None, "overloaded", {"Retry-After": retry_after})


def payload_too_large(limit_bytes: int) -> APIError:
    return APIError(413, f"The request body is larger than this server's limit of {limit_bytes} bytes.",
                    "invalid_request_error", None, "request_too_large")


def engine_dead(trace_id: str) -> APIError:
    return APIError(500, f"The engine has stopped; this replica cannot serve requests (trace id {trace_id}).",
                    "server_error", None, "engine_dead")


def internal_error(trace_id: str) -> APIError:
    return APIError(500, f"The server had an error while processing your request (trace id {trace_id}).",
                    "server_error", None, "internal_error")


def aborted(retry_after_s: float = 1.0) -> APIError:
    """The server ended a request the client did not cancel (shutdown, drain, an operator's abort)."""
    return APIError(503, "The server stopped this request before it finished; retry it.", "server_error",
                    None, "aborted", {"Retry-After": str(max(1, math.ceil(retry_after_s)))})


def shutting_down() -> APIError:
    return APIError(503, "This replica is shutting down; retry the request.", "server_error", None,
                    "shutting_down", {"Retry-After": "1"})


def new_trace_id() -> str:
    return uuid.uuid4().hex[:16]


def log_internal(what: str, exc: BaseException | None = None, detail: str | None = None) -> str:
    """Logs an internal failure with a fresh trace id (traceback included) and returns the id."""
    trace_id = new_trace_id()
    logger.error("%s [trace id %s]%s", what, trace_id, f": {detail}" if detail else "",
                 exc_info=(type(exc), exc, exc.__traceback__) if exc is not None else None)
    return trace_id


def from_engine_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return invalid_request(exc.message, exc.param, exc.code)
    if isinstance(exc, EngineOverloadedError):
        return overloaded(exc.message, exc.retry_after_s)
    if isinstance(exc, EngineDeadError):
        return engine_dead(log_internal("engine dead", exc))
    return internal_error(log_internal("unexpected error", exc))


def sse_error_events(error: APIError) -> str:
    """The end of a failed stream: the error object as one event, then `[DONE]` so every client's
    stream loop terminates the way it does on success."""
    return f"data: {json.dumps(error.body())}\n\ndata: [DONE]\n\n"


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def _param_of(location: tuple) -> str | None:
    """The field's path as a client wrote it: pydantic adds the union member it tried ("str",
    "list[int]", "function-after[...]", "StreamOptions") to the location; those are not fields."""
    names = [str(part) for part in location
             if part != "body" and not (isinstance(part, str) and (part.lower() in _TYPE_TAGS or "[" in part
                                                                   or part[:1].isupper()))]
    return ".".join(names) or None


def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if not errors:
        return invalid_request("Invalid request.").response()
    first = errors[0]
    if first.get("type") == "json_invalid":
        return invalid_request(f"Malformed JSON body: {first.get('msg')}.").response()
    param = _param_of(tuple(first.get("loc", ())))
    message = first.get("msg", "invalid value").removeprefix("Value error, ")
    where = f"{param}: " if param else ""
    extra = f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else ""
    return invalid_request(f"{where}{message}{extra}", param).response()


def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = APIError(exc.status_code, str(exc.detail), error_type, None, code, dict(exc.headers or {}))
    return error.response()


def install_error_handlers(app: FastAPI) -> None:
    """The expected errors. Anything else is answered by `ErrorBoundary` (deployments/ingress/middleware.py):
    an `Exception` handler here would run in Starlette's outermost ServerErrorMiddleware, outside the
    middleware that tags and counts responses."""
    app.add_exception_handler(APIError, lambda _request, exc: exc.response())
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    for engine_error in (InvalidRequestError, EngineOverloadedError, EngineDeadError):
        app.add_exception_handler(engine_error, lambda _request, exc: from_engine_error(exc).response())
