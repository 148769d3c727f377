"""``create_app(settings)``: the FastAPI app and the lifespan that owns every resource.

Order of start-up: agent registry (every model built, every setup run, so a bad configuration
fails start-up before any I/O) -> store (migrated) -> webhook sender (when a webhook secret is
set) -> coordinator -> loop monitor -> metrics sampler -> key gate (keys read, rate limiter;
when keys are configured). Shutdown
runs in reverse through one ``AsyncExitStack``: the coordinator first stops intake and lets
runs in flight finish within ``SHUTDOWN_GRACE_S``, then the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Response
from fastapi_offline import FastAPIOffline
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from threadline import __version__, logs, metrics, web
from threadline.agents import AgentRegistry, AgentSpec
from threadline.agents.clients import ProviderClients
from threadline.agents.registry import load_specs
from threadline.api import contract
from threadline.api import errors as api_errors
from threadline.api.access import KeyRequired, LoopbackOnly
from threadline.api.deps import Services, ServicesDep, require_admin
from threadline.api.errors import PayloadTooLarge, error_response
from threadline.api.gate import open_gate
from threadline.api.intake import Intake
from threadline.api.openai import router as openai_router
from threadline.api.routes import router
from threadline.api.telemetry import RequestTelemetry
from threadline.config import Settings, load_settings
from threadline.coordination import Coordinator
from threadline.coordination.local import LocalCoordinator
from threadline.delivery.sender import Deliverer
from threadline.delivery.targets import check_agent_url
from threadline.errors import ConfigError
from threadline.monitor import LoopLagMonitor
from threadline.shutdown import draining_on_exit
from threadline.store import PostgresStore, Store, open_store

if TYPE_CHECKING:
    from threadline.tracing import Tracing

log = logging.getLogger("threadline")


@contextlib.asynccontextmanager
async def open_coordinator(
    settings: Settings,
    store: Store,
    registry: AgentRegistry,
    on_delivery: Callable[[], None] | None = None,
    tracing: Tracing | None = None,
) -> AsyncIterator[Coordinator]:
    coordinator: Coordinator
    alone: LocalCoordinator | None = None
    if settings.uses_redis:
        from threadline.coordination.redis import RedisCoordinator

        coordinator = await RedisCoordinator.connect(
            settings, store, registry, on_delivery, tracing
        )
    else:
        coordinator = alone = LocalCoordinator(store, registry, settings, on_delivery, tracing)
    try:
        if alone is not None:
            # With Redis, the watchdog finds a stopped process's sessions (threadline:active:{i}).
            await alone.recover_stranded()
        async with draining_on_exit(coordinator, settings.shutdown_grace_s):
            yield coordinator
    finally:
        await coordinator.aclose(settings.shutdown_grace_s)


@contextlib.asynccontextmanager
async def open_services(
    settings: Settings, agents: Sequence[AgentSpec] = (), tracing: Tracing | None = None
) -> AsyncIterator[Services]:
    """Every resource the server needs, opened in order and closed in reverse.

    ``agents`` adds (or overrides by name) specs besides the built-in and the user's module.
    With ``tracing``, asyncpg, Redis and the agents are traced (``tracing.py``).
    """
    async with contextlib.AsyncExitStack() as stack:
        if tracing is not None:
            # First in, last out: the store's and Redis's last statements are traced too.
            await stack.enter_async_context(tracing.instrumenting())
        registry = AgentRegistry(
            [*load_specs(settings.agents_module), *agents],
            default_model=settings.model,
            echo_delay_s=settings.echo_delay_ms / 1000,
            instrument=tracing.agents if tracing is not None else None,
            # The most runs that may ever be in flight (the adaptive limit's ceiling, or the
            # pinned count): a run has at most one model request open.
            clients=ProviderClients(
                pool_size=settings.runs_ceiling,
                transport=settings.provider_http,
                sharing=settings.provider_clients,
            ),
            direct=settings.direct_model_requests,
        )
        stack.push_async_callback(registry.aclose)
        check_webhooks(settings, registry.specs)
        await registry.start()
        store = await stack.enter_async_context(open_store(settings))
        deliverer = None
        if settings.webhook_secret is not None:
            # Without a secret no delivery can be written (webhook_url is refused), so no
            # process polls an outbox that stays empty.
            deliverer = await stack.enter_async_context(Deliverer.running(store, settings))
        coordinator = await stack.enter_async_context(
            open_coordinator(
                settings, store, registry, deliverer.wake if deliverer else None, tracing
            )
        )
        monitor = await stack.enter_async_context(
            LoopLagMonitor(on_lag=coordinator.queue.observe_lag).running()
        )

        def state() -> dict[str, Any]:
            numbers = dict(coordinator.metrics())
            numbers["concurrency_limit"] = coordinator.queue.limit
            if deliverer is not None:
                numbers["webhooks_sending"] = deliverer.metrics()["sending"]
            numbers["pool"] = pool_usage(store)
            return numbers

        sampler = await stack.enter_async_context(metrics.Sampler(state).running())
        gate = await stack.enter_async_context(open_gate(settings)) if settings.keyed else None
        yield Services(settings, store, registry, coordinator, monitor, sampler, deliverer, gate)


def pool_usage(store: Store) -> dict[str, int] | None:
    """The PostgreSQL pool's connections by state; None for SQLite (one connection)."""
    if not isinstance(store, PostgresStore):
        return None
    pool = store.pool
    idle: int = pool.get_idle_size()
    return {"in_use": pool.get_size() - idle, "idle": idle, "max": pool.get_max_size()}


def build_tracing(settings: Settings) -> Tracing:
    """OTLP tracing from the environment; imported only here, so that a server without
    tracing loads no OpenTelemetry code of ours."""
    try:
        from threadline.tracing import Tracing
    except ImportError as exc:
        raise ConfigError(
            "tracing is on (THREADLINE_OTEL or OTEL_EXPORTER_OTLP_ENDPOINT) but OpenTelemetry "
            f"is not installed: pip install 'threadline[otel]' ({exc})"
        ) from exc
    return Tracing.from_settings(settings)


def check_webhooks(settings: Settings, specs: Sequence[AgentSpec]) -> None:
    """An agent's webhook_url must be http(s), and deliveries need a secret to be signed."""
    for spec in specs:
        if spec.webhook_url is None:
            continue
        try:
            check_agent_url(spec.name, spec.webhook_url)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if settings.webhook_secret is None:
            raise ConfigError(
                f"agent {spec.name!r} has a webhook_url but THREADLINE_WEBHOOK_SECRET is unset: "
                "deliveries are signed with it"
            )


def tune_gc() -> None:
    """Keep the garbage collector off the hot path once the app is built.

    ~150,000 long-lived objects exist after start-up (FastAPI, pydantic schemas, pydantic-ai);
    freezing them keeps every collection from walking them again, and a higher young-generation
    threshold stops a collection every 700 allocations while each agent run allocates
    thousands. Measured: 1.4-1.7 ms less CPU per turn and the worst loop lag from ~185 to
    ~70 ms under saturation (docs/performance.md). Costs some memory held a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


class BodyLimit:
    """Reject request bodies over ``limit`` bytes with 413 before the route parses them."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(
                413, PayloadTooLarge.code, f"request body exceeds {self.limit} bytes"
            )
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise PayloadTooLarge(f"request body exceeds {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def serve_app() -> FastAPI:
    """The factory ``threadline serve`` gives uvicorn: each worker process configures its
    logging from the settings (uvicorn's own is off), then builds the app."""
    settings = load_settings()
    logs.configure(settings)
    return create_app(settings)


def create_app(
    settings: Settings | None = None,
    agents: Sequence[AgentSpec] = (),
    tracing: Tracing | None = None,
) -> FastAPI:
    """The app; ``tracing`` (tests pass one with an in-memory exporter) defaults to OTLP when
    the settings turn tracing on, and to none otherwise."""
    settings = settings if settings is not None else load_settings()
    if tracing is None and settings.tracing:
        tracing = build_tracing(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.keyed:
            log.warning(
                "THREADLINE_API_KEY and THREADLINE_API_KEYS_FILE are unset: requests are not "
                "authenticated, so clients from other machines get 403 (loopback only, "
                "/health excepted)"
            )
        async with contextlib.AsyncExitStack() as stack:
            try:
                services = await stack.enter_async_context(open_services(settings, agents, tracing))
            except ConfigError as exc:
                # One readable line ahead of the server's traceback of the failed start-up.
                log.error("start-up failed: %s", exc)
                raise
            app.state.services = services
            if settings.gc_tuning:
                tune_gc()
            log.info(
                "threadline %s ready: store=%s coordinator=%s model=%s",
                __version__,
                settings.backend,
                f"redis ({settings.redis_mode})" if settings.uses_redis else "local",
                settings.model,
            )
            yield

    # /docs and /redoc with their assets served from a package, not a CDN: they work offline.
    app = FastAPIOffline(title="threadline", version=__version__, lifespan=lifespan)
    api_errors.install(app)
    contract.install(app, settings)
    app.include_router(router)
    app.include_router(openai_router)
    web.install(app)
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    # Added last but one, so it runs early: a refused request costs no body reading.
    app.add_middleware(KeyRequired if settings.keyed else LoopbackOnly)
    if tracing is not None:
        tracing.instrument_app(app)
    if settings.intake_concurrency:
        # Outside all but the telemetry: a request waiting for a slot has cost next to
        # nothing yet, and its log line and latency still count the wait.
        app.add_middleware(Intake, slots=settings.intake_concurrency)
    # Outermost of ours: every response gets a request id, a log line and its metrics,
    # refusals by the one above included.
    app.add_middleware(RequestTelemetry)

    @app.get("/health", tags=["ops"])
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", tags=["ops"], responses=contract.errors(503))
    async def ready(services: ServicesDep) -> dict[str, str]:
        await services.store.ping()
        await services.coordinator.ping()
        return {"status": "ready", "store": services.settings.backend}

    @app.get(
        "/metrics",
        tags=["ops"],
        dependencies=[Depends(require_admin)],
        response_class=Response,
        responses={
            200: {
                "description": "Every metric in Prometheus' text format (docs/operations.md).",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus_metrics(services: ServicesDep) -> Response:
        """Prometheus metrics of every worker of this server (docs/operations.md, Metrics)."""
        services.sampler.sample()  # this process's gauges as of now; the others' <= 1 s old
        # Reading every worker's files is file I/O: off the event loop.
        body = await asyncio.to_thread(metrics.exposition)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    if settings.debug_metrics:
        # Admin keys only (the loopback rule without keys): the counters are the server's.
        guarded = [Depends(require_admin)]

        def snapshot(services: Services) -> dict[str, Any]:
            stats = services.registry.stats
            return {
                "pid": os.getpid(),  # tells the workers of one `serve --workers N` apart
                "loop_lag": services.monitor.snapshot(),
                "model_calls": {
                    "started": stats.started,
                    "completed": stats.completed,
                    "cancelled": stats.cancelled,
                },
                "agent_inits": services.registry.init_count,
                "coordinator": services.coordinator.metrics(),
                "concurrency": {
                    "limit": services.coordinator.queue.limit,
                    "adaptive": services.settings.adaptive_runs,
                },
                "webhooks": services.deliverer.metrics() if services.deliverer else None,
            }

        @app.get("/debug/metrics", tags=["ops"], dependencies=guarded)
        async def debug_metrics(services: ServicesDep) -> dict[str, Any]:
            return snapshot(services)

        @app.post("/debug/metrics/reset", tags=["ops"], dependencies=guarded)
        async def reset_metrics(services: ServicesDep) -> dict[str, Any]:
            """The metrics as they were, then a fresh loop-lag window (benchmarks' phases)."""
            body = snapshot(services)
            services.monitor.reset()
            return body

    return app
