"""Admin errors never carry Ray's remote tracebacks: the ControllerClient passes on the controller's own
ValueError message, and anything else becomes a 503 with a trace id. (Issue 15, failure 6.)"""

from __future__ import annotations

import asyncio

from fastapi.testclient import TestClient
from ray.exceptions import RayTaskError

from deployments.cluster.controller import ControllerClient
from tests.deployments.fake_engine import FakeEngine
from tests.reliability.conftest import assert_openai_error, make_app, trace_id_of

# What Ray hands the caller when the actor method raised: the remote traceback, with ANSI codes, the
# actor's pid and id, and file paths.
REMOTE_TRACEBACK = ("\x1b[36mray::ClusterController.set_migration_policy()\x1b[39m (pid=4242, ip=127.0.0.1, "
                    "actor_id=abc123)\n  File \"/work/deployments/migration/policy.py\", line 250, in "
                    "create_migration_policy\nValueError: unknown migration policy 'bogus'")


class _Method:
    def __init__(self, error: BaseException):
        self._error = error

    def remote(self, *args):
        async def fail():
            raise self._error
        return fail()


class _ControllerHandle:
    """Stands in for the controller's actor handle: every method call fails with `error`."""

    def __init__(self, error: BaseException):
        self._error = error

    def __getattr__(self, name):
        return _Method(self._error)


def client_failing_with(error: BaseException) -> ControllerClient:
    client = ControllerClient("r1", "controller", "namespace")
    client._handle = _ControllerHandle(error)
    return client


def ray_task_error(cause: BaseException) -> RayTaskError:
    return RayTaskError("set_migration_policy", REMOTE_TRACEBACK, cause).as_instanceof_cause()


def test_the_controller_client_unwraps_the_controllers_value_error():
    client = client_failing_with(ray_task_error(ValueError("unknown migration policy 'bogus'")))
    try:
        asyncio.run(client.set_migration_policy("bogus"))
    except ValueError as exc:
        assert str(exc) == "unknown migration policy 'bogus'"
    else:
        raise AssertionError("no error")


def test_a_bad_policy_name_is_a_clean_400():
    admin = client_failing_with(ray_task_error(ValueError("unknown migration policy 'bogus'")))
    with TestClient(make_app(FakeEngine(), api_key="k", cluster_admin=admin), raise_server_exceptions=False) as http:
        response = http.post("/v1/admin/migration_policy", json={"name": "bogus"},
                             headers={"Authorization": "Bearer k"})
    error = assert_openai_error(response, 400, None, None)
    assert error["message"] == "unknown migration policy 'bogus'"


def test_other_controller_failures_are_a_503_with_a_trace_id_only():
    admin = client_failing_with(ray_task_error(KeyError("replicas")))
    with TestClient(make_app(FakeEngine(), api_key="k", cluster_admin=admin), raise_server_exceptions=False) as http:
        response = http.post("/v1/admin/migrate", json={"request_id": "cmpl-1"}, headers={"Authorization": "Bearer k"})
    error = assert_openai_error(response, 503, None, "controller_unavailable")
    trace_id_of(error["message"])
    for leak in ("\x1b", "pid=", "actor_id", "/work/", "Traceback", "KeyError"):
        assert leak not in response.text
