"""``threadline serve | migrate | run``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import logging
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence

from threadline.config import Settings, load_settings
from threadline.errors import ConfigError, SessionAgentMismatch, ThreadlineError
from threadline.logs import configure as configure_logs

# prometheus-client's: where every worker writes its metrics (threadline/metrics.py).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _serve(settings: Settings, reload: bool) -> None:

    settings.check_serving()
    cleanup: Callable[[], None] = lambda: None  # noqa: E731
    if settings.workers > 1 and not reload:
        cleanup = _use_metrics_dir()
    # Every agent's model is built here, before uvicorn starts, so a missing provider key is
    # exit code 2 with one line naming it, for any number of workers. (Setups run in each
    # worker's lifespan; a failing one makes uvicorn exit with its start-up failure code.)
    asyncio.run(_check_agents(settings))
    # Worker processes build their own Settings from the environment in create_app, so the
    # command-line overrides travel there.
    os.environ["THREADLINE_HOST"] = settings.host
    os.environ["THREADLINE_PORT"] = str(settings.port)
    os.environ["THREADLINE_WORKERS"] = str(settings.workers)
    try:
        _run_uvicorn(settings, reload)
    finally:
        cleanup()


def _run_uvicorn(settings: Settings, reload: bool) -> None:
    import uvicorn

    uvicorn.run(
        # Configures each worker's logging (threadline/logs.py), then builds the app.
        "threadline.app:serve_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers if not reload else None,
        reload=reload,
        # uvicorn treats 0 as "no limit"; the lifespan then gives runs still in flight the
        # same grace again, so a shutdown takes at most twice SHUTDOWN_GRACE_S.
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
        # Our logging, not uvicorn's: the same lines with one worker or N. Its access log is
        # replaced by our per-request line (api/telemetry.py).
        log_config=None,
        access_log=False,
    )


def _use_metrics_dir() -> Callable[[], None]:
    """Turn on prometheus-client's multiprocess mode for the workers; return the clean-up.

    Set here, before anything imports prometheus_client (it reads the variable at import),
    and inherited by every worker: each writes its samples there and a scrape adds them up
    (threadline/metrics.py). An operator's directory is used and emptied (files of an earlier
    run would add old counts to ours); without one a fresh temporary directory is made, and
    removed when the server stops.
    """
    given = os.environ.get(METRICS_DIR_ENV) or os.environ.get(METRICS_DIR_ENV.lower())
    if given:
        os.environ[METRICS_DIR_ENV] = given
        os.makedirs(given, exist_ok=True)
        for stale in glob.glob(os.path.join(given, "*.db")):
            os.remove(stale)
        return lambda: None
    made = tempfile.mkdtemp(prefix="threadline-metrics-")
    os.environ[METRICS_DIR_ENV] = made
    return lambda: shutil.rmtree(made, ignore_errors=True)


async def _check_agents(settings: Settings) -> None:
    from threadline.agents import AgentRegistry
    from threadline.agents.registry import load_specs

    registry = AgentRegistry(load_specs(settings.agents_module), default_model=settings.model)
    try:
        registry.check()
    finally:
        await registry.aclose()


async def _migrate(settings: Settings) -> None:
    from threadline.store import open_store

    async with open_store(settings):
        pass
    print(f"migrations applied to {settings.backend} store")


async def _run_once(settings: Settings, agent: str, message: str, session: str | None) -> int:
    from threadline.app import open_services
    from threadline.coordination import TurnRequest

    async with open_services(settings) as services:
        services.registry.spec(agent)
        if session:
            record = await services.store.get_or_create_session(session, agent=agent)
            if record.agent != agent:
                raise SessionAgentMismatch(record.id, record.agent, agent)
        else:
            record = await services.store.create_session(agent)
        answer = await services.coordinator.submit(
            TurnRequest(
                record.id,
                agent,
                message,
                settings.queue_strategy,
                history_limit=settings.history_limit,
            )
        )
        if answer.outcome.error is not None:
            raise answer.outcome.error
        result = answer.outcome.result
        assert result is not None
        print(result.message)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="threadline")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--reload", action="store_true")
    commands.add_parser("migrate", help="apply database migrations and exit")
    run = commands.add_parser("run", help="send one message to an agent, in-process")
    run.add_argument("agent")
    run.add_argument("message")
    run.add_argument("--session", help="session name to continue (created if absent)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.suppress(ConfigError):  # reported below, when the command loads them
        configure_logs(load_settings())
    try:
        if args.command == "serve":
            overrides = {
                k: v for k in ("host", "port", "workers") if (v := getattr(args, k)) is not None
            }
            _serve(load_settings(**overrides), args.reload)
        elif args.command == "migrate":
            asyncio.run(_migrate(load_settings()))
        else:
            sys.exit(
                asyncio.run(_run_once(load_settings(), args.agent, args.message, args.session))
            )
    except ConfigError as exc:
        print(f"threadline: {exc}", file=sys.stderr)
        sys.exit(2)
    except ThreadlineError as exc:
        print(f"threadline: {exc.code}: {exc}", file=sys.stderr)
        sys.exit(1)
