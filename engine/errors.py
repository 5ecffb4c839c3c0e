"""The errors the engine raises on purpose; each maps to one HTTP status (deployments/ingress/errors.py).

A module of their own so that engine.sampling_params (which raises InvalidRequestError) and engine.api
(which imports SamplingParams) do not import each other. engine.api re-exports them.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is wrong (HTTP 400). `param` names the offending field when known."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class EngineOverloadedError(EngineError):
    """The waiting queue is full (HTTP 503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class EngineDeadError(EngineError):
    """The engine loop stopped; no request can be served (HTTP 500)."""
