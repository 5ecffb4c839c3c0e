"""`build_openai_app(engine_provider, settings)`: the FastAPI app one LLMServer replica serves.

The app knows nothing of Ray: the replica passes a callable that returns its engine (None while it is
loading) and, when a cluster controller exists, a coroutine function that returns the cluster view. Tests
build the same app around a fake engine.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field

from deployments.ingress import errors
from deployments.ingress.engine_bindings import EngineBindings
from deployments.ingress.metrics import ServingMetrics
from deployments.ingress.middleware import REPLICA_HEADER, ApiKeyGuard, BodyLimit, ResponseGuard
from deployments.ingress.openapi import ADMIN_RESPONSES, GENERATION_RESPONSES, METRICS_RESPONSES, V1_RESPONSES
from deployments.ingress.protocol import (
    BodyRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    SamplingKwargs,
    now_s,
)
from deployments.ingress.serving import OpenAIServing
from deployments.ingress.validation import DEFAULT_MAX_BODY_BYTES
from deployments.migration.relay import RelayRegistry
from engine.api import EngineClient, EngineDeadError

__all__ = ["REPLICA_HEADER", "AppSettings", "build_openai_app"]


class ClusterAdmin(Protocol):
    """What POST /v1/admin/* calls (deployments.cluster.controller.ControllerClient has it)."""

    async def force_migration(self, request_id: str, target: str | None = None, mode: str = "auto") -> dict: ...

    async def set_migration_policy(self, name: str, options: dict[str, Any] | None = None) -> str: ...


@dataclass(frozen=True)
class AppSettings:
    served_model_name: str | None = None  # None: the engine's model_name (an engine of several models: theirs)
    api_key: str | None = field(default=None, repr=False)  # set: /v1/* needs `Authorization: Bearer <key>`
    replica_id: str = "local"
    bindings: EngineBindings | None = None  # None: the engine package's own (imported on first use)
    cluster_view: Callable[[], Awaitable[dict[str, Any]]] | None = None
    default_sampling: SamplingKwargs = field(default_factory=dict)  # for knobs a request leaves out
    relays: RelayRegistry | None = None  # migrated requests' streams (None: a fresh registry)
    migration_stats: Callable[[], dict[str, Any]] | None = None  # this replica's migration counters
    cluster_admin: ClusterAdmin | None = None  # POST /v1/admin/* (needs api_key)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413 while being read


def build_openai_app(engine_provider: Callable[[], EngineClient | None], settings: AppSettings) -> FastAPI:
    app = FastAPI(title="elastic-serve", docs_url=None, redoc_url=None)
    errors.install_error_handlers(app)
    bindings_cache: list[EngineBindings] = [settings.bindings] if settings.bindings else []

    def bindings_provider() -> EngineBindings:
        if not bindings_cache:
            bindings_cache.append(EngineBindings.from_engine_package())
        return bindings_cache[0]

    def served_models() -> dict[str, str]:
        """The names clients send -> the engine's model names, the default model first."""
        engine = engine_provider()
        if engine is None:
            return {settings.served_model_name or "unknown": ""}
        if settings.served_model_name and len(engine.model_names) == 1:
            return {settings.served_model_name: engine.model_name}
        return {name: name for name in engine.model_names}

    metrics = ServingMetrics(engine_provider, next(iter(served_models())), settings.replica_id,
                             settings.migration_stats, served_models)
    serving = OpenAIServing(engine_provider, bindings_provider, metrics, served_models,
                            settings.default_sampling,
                            settings.relays if settings.relays is not None else RelayRegistry())
    app.state.metrics = metrics
    app.state.serving = serving

    def on_status(status: int) -> None:
        if status >= 400:
            metrics.record_error(status)

    app.add_middleware(BodyLimit, max_body_bytes=settings.max_body_bytes)
    if settings.api_key is not None:
        app.add_middleware(ApiKeyGuard, api_key=settings.api_key)
    app.add_middleware(ResponseGuard, replica_id=settings.replica_id, on_status=on_status)  # outermost

    v1 = APIRouter(prefix="/v1", responses=V1_RESPONSES)

    @v1.post("/completions", responses=GENERATION_RESPONSES)
    async def completions(body: CompletionRequest):
        return await serving.completions(body)

    @v1.post("/chat/completions", responses=GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest):
        return await serving.chat(body)

    @v1.get("/models")
    async def models():
        engine = serving.engine()
        cards = [ModelCard(id=served, created=now_s(), max_model_len=engine.for_model(name).max_model_len)
                 for served, name in served_models().items()]
        return JSONResponse(ModelList(data=cards).model_dump(mode="json"))

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
            raise controller_unavailable(exc) from exc

    _add_admin_routes(v1, settings)
    app.include_router(v1)

    @app.get("/health", responses={503: {"description": "Loading, draining, stalled or dead"}})
    async def health():
        engine = engine_provider()
        if engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        if serving.is_draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            await engine.check_health()
        except EngineDeadError as exc:
            return JSONResponse({"status": "dead", "detail": str(exc)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
    async def prometheus_metrics():
        content, content_type = metrics.exposition()
        return Response(content, media_type=content_type)

    return app


def controller_unavailable(exc: BaseException) -> errors.APIError:
    trace_id = errors.log_internal("cluster controller call failed", exc)
    return errors.APIError(503, f"The cluster controller is unavailable (trace id {trace_id}).", "server_error",
                           None, "controller_unavailable", {"Retry-After": "1"})


class MigrateBody(BodyRequest):
    model_config = ConfigDict(extra="forbid")
    request_id: str  # an engine request id, or a response id (`cmpl-…`: all its choices)
    target: str | None = None  # a replica id; None: the least loaded other replica
    mode: Literal["auto", "copy", "recompute"] = "auto"


class PolicyBody(BodyRequest):
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
        # The ControllerClient unwraps Ray's errors: a ValueError here is the controller's own message
        # (a bad policy name), never a remote traceback.
        try:
            return await coroutine_function(*args)
        except ValueError as exc:
            raise errors.invalid_request(str(exc), None) from exc
        except Exception as exc:
            raise controller_unavailable(exc) from exc

    @v1.post("/admin/migrate", responses=ADMIN_RESPONSES)
    async def migrate(body: MigrateBody):
        """Migrates a running request now, whatever the migration policy (tests, operators)."""
        return await call(admin().force_migration, body.request_id, body.target, body.mode)

    @v1.post("/admin/migration_policy", responses=ADMIN_RESPONSES)
    async def migration_policy(body: PolicyBody):
        return {"migration_policy": await call(admin().set_migration_policy, body.name, body.options)}
