"""``threadline serve | migrate | run | keys``.

The directory ``threadline`` starts in is importable: ``THREADLINE_AGENTS_MODULE=agents`` finds
``./agents.py`` (and ``myapp.agents`` finds ``./myapp/agents.py``) without ``PYTHONPATH``, as
``python -m`` and ``uvicorn`` would. It goes at the *end* of ``sys.path``, so a file in that
directory never shadows the standard library or an installed package of the same name.
"""

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
from pathlib import Path

from threadline.config import Settings, load_settings
from threadline.errors import ConfigError, SessionAgentMismatch, ThreadlineError
from threadline.logs import configure as configure_logs

# prometheus-client's: where every worker writes its metrics (threadline/metrics.py).
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Seconds uvicorn waits past SHUTDOWN_GRACE_S for responses before cancelling requests.
SHUTDOWN_MARGIN_S = 5


def _import_from_cwd() -> None:
    # A console script's sys.path starts with its bin directory, not the working directory.
    # uvicorn's worker and reloader processes are spawned with this sys.path, so they import
    # the agents module the same way.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


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
        # The coordinator starts draining at the signal (shutdown.py): runs get
        # SHUTDOWN_GRACE_S, then their callers get 503. uvicorn waits longer than that for
        # those responses to go out before it cancels what is left (a cancelled request gets
        # its bare 500); a stream still open after the drain holds it up to the margin.
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s) + SHUTDOWN_MARGIN_S,
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


def _keys(args: argparse.Namespace) -> None:
    """``keys create | list | revoke`` on the key file (``threadline/keyfile.py``)."""
    from threadline import keyfile as keys

    path: Path | None = args.file or load_settings().api_keys_file
    if path is None:
        raise ConfigError("name the key file: --file PATH or THREADLINE_API_KEYS_FILE")
    if args.keys_command == "create":
        if args.admin == (args.user is not None):
            raise ConfigError("give exactly one of --user ID and --admin")
        key, entry = keys.create_key(
            path,
            role="admin" if args.admin else "user",
            user_id=args.user,
            rate_limit_per_min=args.rate,
            name=args.name,
        )
        # The key goes to stdout alone (scripts capture it); it is not stored anywhere.
        print(key)
        print(
            f"created key {entry.name!r} ({_describe(entry)}) in {str(path)!r}; "
            "it is shown only now",
            file=sys.stderr,
        )
    elif args.keys_command == "list":
        for entry in keys.read_keys(path):
            print(f"{entry.name}\t{_describe(entry)}\tcreated {entry.created_at or '?'}")
    else:
        entry = keys.revoke_key(path, args.name)
        print(f"revoked key {entry.name!r} ({_describe(entry)})", file=sys.stderr)


def _describe(entry: object) -> str:
    from threadline.keyfile import ApiKey

    assert isinstance(entry, ApiKey)
    who = "admin" if entry.role == "admin" else f"user {entry.user_id}"
    rate = f"{entry.rate_limit_per_min}/min" if entry.rate_limit_per_min else "no rate limit"
    return f"{who}, {rate}"


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
    keys = commands.add_parser("keys", help="create, list or revoke API keys (a key file)")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    file_help = "the key file (default: THREADLINE_API_KEYS_FILE)"
    create = keys_commands.add_parser("create", help="add a key; prints it once")
    create.add_argument("--user", help="the user_id the key acts for (a user key)")
    create.add_argument("--admin", action="store_true", help="an admin key: every user's data")
    create.add_argument("--rate", type=int, default=0, help="requests per minute (0: no limit)")
    create.add_argument("--name", help="a unique name (default: USER-xxxxxx)")
    create.add_argument("--file", type=Path, help=file_help)
    listing = keys_commands.add_parser("list", help="the keys in the file (never the keys)")
    listing.add_argument("--file", type=Path, help=file_help)
    revoke = keys_commands.add_parser("revoke", help="remove a key by name")
    revoke.add_argument("name")
    revoke.add_argument("--file", type=Path, help=file_help)
    args = parser.parse_args(argv)

    _import_from_cwd()
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
        elif args.command == "keys":
            _keys(args)
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
