"""/openapi.json lists what the server answers, and a bounded schemathesis run over it finds no 5xx, no
undocumented status and no undocumented media type. (Issue 15, failure 7.) The default suite runs a few
examples per operation; `-m slow` runs many more."""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from tests.deployments.fake_engine import FakeEngine
from tests.reliability.conftest import make_app

ERROR_STATUSES = {"400", "401", "404", "413", "422", "500", "503"}


def test_the_spec_lists_our_statuses_and_media_types():
    with TestClient(make_app(FakeEngine(), api_key="k")) as client:
        spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/v1/completions", "/v1/chat/completions"):
        responses = paths[path]["post"]["responses"]
        assert ERROR_STATUSES <= set(responses), (path, sorted(responses))
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        error_schema = responses["400"]["content"]["application/json"]["schema"]
        assert error_schema == {"$ref": "#/components/schemas/ErrorResponse"}
        assert "Retry-After" in responses["503"]["headers"]
    assert {"403", "400", "413"} <= set(paths["/v1/admin/migration_policy"]["post"]["responses"])
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    assert "401" in paths["/v1/models"]["get"]["responses"]


SCHEMA = schemathesis.openapi.from_asgi("/openapi.json", make_app(FakeEngine(token_delay_s=0.0, max_model_len=64)))
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]
COMMON = {"deadline": None, "database": None, "suppress_health_check": list(HealthCheck)}


def _run(operation, mode: GenerationMode, max_examples: int, derandomize: bool) -> None:
    # Hypothesis drives schemathesis's strategies directly: its pytest plugin does not load under this pytest.
    @given(case=operation.as_strategy(mode))
    @settings(max_examples=max_examples, derandomize=derandomize, **COMMON)
    def check(case):
        case.call_and_validate(checks=CHECKS)

    check()


# Negative cases need something to break: only the operations with a body have one.
CASES = [pytest.param(operation, mode, id=f"{operation.label}-{mode.value}")
         for operation in OPERATIONS for mode in GenerationMode
         if mode is GenerationMode.POSITIVE or operation.method.upper() == "POST"]


@pytest.mark.parametrize("operation, mode", CASES)
def test_schemathesis_finds_no_server_error(operation, mode):
    _run(operation, mode, max_examples=15, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("operation, mode", CASES)
def test_schemathesis_long_run_finds_no_server_error(operation, mode):
    _run(operation, mode, max_examples=500, derandomize=False)
