"""`build_openai_app(engine_provider, settings)`: the FastAPI app one LLMServer replica serves.

The app knows nothing of Ray: the replica passes a callable that returns its engine (None while it is
loading) and, when a cluster controller exists, a coroutine function that returns the cluster view. Tests
build the same app around a fake engine.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from deployments.ingress import errors
from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.metrics import ServingMetrics
from deployments.ingress.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingKwargs,
    now_s,
)
from deployments.ingress.serving import OpenAIServing
from deployments.migration.relay import RelayRegistry
from engine.api import EngineClient, EngineDeadError

REPLICA_HEADER = "x-elastic-replica"


class ClusterAdmin(Protocol):
    """What POST /v1/admin/* calls (deployments.cluster.controller.ControllerClient has it)."""

    async def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict: ...

    async def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str: ...


@dataclass(frozen=True)
class AppSettings:
    served_model_name: str | None = None  # None: the engine's model_name
    api_key: str | None = field(default=None, repr=False)  # set: /v1/* needs `Authorization: Bearer <key>`
    replica_id: str = "local"
    bindings: EngineBindings | None = None  # None: the engine package's own (imported on first use)
    cluster_view: Callable[[], Awaitable[dict[str, Any]]] | None = None
    default_sampling: SamplingKwargs = field(default_factory=dict)  # for knobs a request leaves out
    relays: RelayRegistry | None = None  # migrated requests' streams (None: a fresh registry)
    migration_stats: Callable[[], dict[str, Any]] | None = None  # this replica's migration counters
    cluster_admin: ClusterAdmin | None = None  # POST /v1/admin/* (needs api_key)


class _ReplicaMiddleware:
    """Tags every response with the replica that served it and counts error statuses.

    Plain ASGI (not BaseHTTPMiddleware) so streaming bodies and disconnect cancellation pass through."""

    def __init__(self, app, replica_id: str, on_status: Callable[[int], None]):
        self._app = app
        self._header = (REPLICA_HEADER.encode(), replica_id.encode())
        self._on_status = on_status

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return

        async def send_tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
                self._on_status(message["status"])
            await send(message)

        await self._app(scope, receive, send_tagged)


def _route_path(scope) -> str:
    """The path the app routes on: under a Serve route_prefix, `path` still starts with `root_path`."""
    path, root_path = scope["path"], scope.get("root_path", "")
    return path[len(root_path):] if root_path and path.startswith(root_path) else path


class _ApiKeyMiddleware:
    """`Authorization: Bearer <key>` on /v1/*, checked before the body is read: a caller without the key
    learns nothing about what the body should be."""

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


def build_openai_app(engine_provider: Callable[[], EngineClient | None], settings: AppSettings) -> FastAPI:
    app = FastAPI(title="elastic-serve", docs_url=None, redoc_url=None)
    errors.install_error_handlers(app)
    bindings_cache: list[EngineBindings] = [settings.bindings] if settings.bindings else []

    def bindings_provider() -> EngineBindings:
        if not bindings_cache:
            bindings_cache.append(EngineBindings.from_engine_package())
        return bindings_cache[0]

    def served_model_name() -> str:
        if settings.served_model_name:
            return settings.served_model_name
        engine = engine_provider()
        return engine.model_name if engine is not None else "unknown"

    metrics = ServingMetrics(engine_provider, served_model_name(), settings.replica_id, settings.migration_stats)
    serving = OpenAIServing(engine_provider, bindings_provider, metrics, served_model_name,
                            settings.default_sampling,
                            settings.relays if settings.relays is not None else RelayRegistry())
    app.state.metrics = metrics
    app.state.serving = serving

    def on_status(status: int) -> None:
        if status >= 400:
            metrics.record_error(status)

    if settings.api_key is not None:
        app.add_middleware(_ApiKeyMiddleware, api_key=settings.api_key)
    app.add_middleware(_ReplicaMiddleware, replica_id=settings.replica_id, on_status=on_status)  # outermost

    v1 = APIRouter(prefix="/v1")

    @v1.post("/completions")
    async def completions(body: CompletionRequest):
        return await serving.completions(body)

    @v1.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        return await serving.chat(body)

    @v1.get("/models")
    async def models():
        engine = serving.engine()
        card = ModelCard(id=served_model_name(), created=now_s(), max_model_len=engine.max_model_len)
        return JSONResponse(ModelList(data=[card]).model_dump(mode="json"))

    @v1.get("/memory")
    async def memory():
        return {"replica": settings.replica_id, "ranks": serving.engine().memory_telemetry()}

    @v1.get("/cluster")
    async def cluster():
        if settings.cluster_view is None:
            raise errors.APIError(404, "This server runs without a cluster controller.",
                                  "invalid_request_error", None, "not_found")
        try:
            return await settings.cluster_view()
        except Exception as exc:  # the controller is restarting or gone; the replica still serves
            raise errors.APIError(503, f"The cluster controller is unavailable: {exc!r}", "server_error",
                                  None, "controller_unavailable", {"Retry-After": "1"}) from exc

    _add_admin_routes(v1, settings)
    app.include_router(v1)

    @app.get("/health")
    async def health():
        engine = engine_provider()
        if engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        try:
            await engine.check_health()
        except EngineDeadError as exc:
            return JSONResponse({"status": "dead", "detail": str(exc)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        content, content_type = metrics.exposition()
        return Response(content, media_type=content_type)

    return app


class MigrateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str  # an engine request id, or a response id (`cmpl-…`: all its choices)
    target: str | None = None  # a replica id; None: the least loaded other replica
    mode: Literal["auto", "copy", "recompute"] = "auto"


class PolicyBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


def _add_admin_routes(v1: APIRouter, settings: AppSettings) -> None:
    """Operator endpoints, behind the API key (so they exist only when one is configured)."""

    def admin():
        if settings.api_key is None:
            raise errors.APIError(403, "Admin endpoints need an api_key in the server's configuration.",
                                  "invalid_request_error", None, "admin_disabled")
        if settings.cluster_admin is None:
            raise errors.APIError(404, "This server runs without a cluster controller.",
                                  "invalid_request_error", None, "not_found")
        return settings.cluster_admin

    async def call(coroutine_function, *args):
        try:
            return await coroutine_function(*args)
        except ValueError as exc:
            raise errors.invalid_request(str(exc), None) from exc
        except Exception as exc:
            raise errors.APIError(503, f"The cluster controller is unavailable: {exc!r}", "server_error",
                                  None, "controller_unavailable", {"Retry-After": "1"}) from exc

    @v1.post("/admin/migrate")
    async def migrate(body: MigrateBody):
        """Migrates a running request now, whatever the migration policy (tests, operators)."""
        return await call(admin().force_migration, body.request_id, body.target, body.mode)

    @v1.post("/admin/migration_policy")
    async def migration_policy(body: PolicyBody):
        return {"migration_policy": await call(admin().set_migration_policy, body.name, body.options)}
