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

