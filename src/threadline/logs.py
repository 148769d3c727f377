"""Logging: configured once per process from settings, the same with any number of workers.

``configure`` replaces whatever handlers the root logger has with one on stderr, in
``LOG_FORMAT`` (``text`` for people, ``json`` for collectors: one object per line) at
``LOG_LEVEL``. ``threadline serve`` calls it in the CLI process and again in every uvicorn
worker (``app.serve_app``): uvicorn's own logging config is turned off so its lines go through
ours, and its access log is replaced by our per-request line (``api/telemetry.py``).

Each line carries the ids of what it is about, from a context variable: the request id for
everything a request logs, the session and run ids once known. The request's ``LogContext``
is set by the request middleware and filled in by routes (``bind``); a run sets its own
(``scope``), since its task outlives and may serve many requests.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import uuid
from contextvars import ContextVar
from uuid import UUID

from pythonjsonlogger.json import JsonFormatter

from threadline.config import LogFormat, Settings

FIELDS = ("request_id", "session_id", "run_id")
MAX_REQUEST_ID = 128

# Their INFO lines are one per provider HTTP request: noise at our level of detail, and they
# made one worker log differently from N.
QUIET_LOGGERS = ("httpx", "httpcore", "openai", "anthropic", "google_genai", "groq", "mistralai")


@dataclasses.dataclass(slots=True)
class LogContext:
    request_id: str | None = None
    session_id: str | None = None
    run_id: str | None = None


_context: ContextVar[LogContext | None] = ContextVar("threadline_log_context", default=None)


def current() -> LogContext | None:
    return _context.get()


def scope(**fields: str | UUID | None) -> LogContext:
    """Start a fresh context for what this task logs from now on (a request, a run)."""
    context = LogContext(**{k: str(v) if v is not None else None for k, v in fields.items()})
    _context.set(context)
    return context


def bind(*, session_id: UUID | str | None = None, run_id: UUID | str | None = None) -> None:
    """Add ids to the current context (a route that has found its session, say)."""
    context = _context.get()
    if context is None:
        return
    if session_id is not None:
        context.session_id = str(session_id)
    if run_id is not None:
        context.run_id = str(run_id)


def request_id(header: str | None) -> str:
    """The client's ``X-Request-Id`` if it is printable ASCII and at most 128 characters (it
    goes into log lines and a response header), else a new one."""
    if header and len(header) <= MAX_REQUEST_ID and header.isascii() and header.isprintable():
        return header
    return uuid.uuid4().hex


class _ContextFilter(logging.Filter):
    """Copies the context's ids onto every record (unless the call's ``extra`` set them)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = _context.get()
        for name in FIELDS:
            if not hasattr(record, name):
                setattr(record, name, getattr(context, name) if context is not None else None)
        return True


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message [request_id=... session_id=... run_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [f"{n}={v}" for n in FIELDS if (v := getattr(record, n, None)) is not None]
        if not ids:
            return line
        # The ids go on the first line: a traceback follows it.
        first, newline, rest = line.partition("\n")
        return f"{first} [{' '.join(ids)}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time, level, logger, pid (tells workers apart), message, the
    ids (null when unknown), any ``extra`` fields, and ``exc_info`` (the traceback) for
    exceptions."""
    return JsonFormatter(
        ["levelname", "name", "process", "message"],
        rename_fields={"levelname": "level", "name": "logger", "process": "pid"},
        timestamp="time",
    )


def formatter(kind: LogFormat) -> logging.Formatter:
    return json_formatter() if kind == "json" else TextFormatter()


def configure(settings: Settings) -> None:
    """Send every log line of this process to stderr as ``settings`` say."""
    # No line shows the file, function or thread it was logged from: stop collecting them for
    # every record, as the logging HOWTO's "Optimization" section says to (the caller's frame
    # is looked up otherwise): ~20 % of a line's cost; three lines a turn (docs/performance.md).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(settings.log_format))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True
        uvicorn_logger.setLevel(logging.NOTSET)
    # Our per-request line (api/telemetry.py) replaces uvicorn's access line. uvicorn writes
    # one whenever its logger has a handler anywhere up the tree (``hasHandlers()``), whatever
    # ``access_log`` says once logging is configured, so it must reach none.
    logging.getLogger("uvicorn.access").propagate = False
