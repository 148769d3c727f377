"""Prometheus metrics: every metric object, defined once, and how ``GET /metrics`` renders them.

One process keeps its metrics in prometheus-client's default registry. ``threadline serve
--workers N`` runs N processes, so the CLI turns on prometheus-client's multiprocess mode
before any worker starts (``cli.py``): each process writes its samples to
memory-mapped files in ``PROMETHEUS_MULTIPROC_DIR`` and whichever worker answers a scrape adds
up every worker's files. prometheus-client reads that variable when it is first imported, which
is why the CLI sets it before anything imports this module.

Counters and histograms are updated where things happen. Gauges that describe state a process
holds (queue depth, leases, pool) are sampled from that state once a second by each process's
``Sampler`` (multiprocess mode has no collect-time callbacks) and summed over live processes
(``livesum``). The table of every metric is in docs/operations.md, "Metrics".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from threadline.tasks import owned

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
SAMPLE_INTERVAL_S = 1.0

# Seconds: from a fast store round trip to a slow model answer.
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_LAG = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# -- HTTP ------------------------------------------------------------------------------------
HTTP_REQUESTS = Counter(
    "threadline_http_requests",
    "HTTP requests answered, by route template, method and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "threadline_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response (a stream: its whole life).",
    ["method", "route", "status"],
    buckets=_LATENCY,
)
STREAMS_OPEN = Gauge(
    "threadline_http_streams_open",
    "Server-Sent Events responses open now.",
    ["route"],
    multiprocess_mode="livesum",
)

# -- runs and merges -------------------------------------------------------------------------
RUNS_STARTED = Counter(
    "threadline_runs_started", "Runs the queue started (a merge restarts one).", ["agent"]
)
RUNS_FINISHED = Counter(
    "threadline_runs_finished",
    "Runs ended, by outcome: succeeded, failed, superseded (a merge), cancelled (a client), "
    "shutdown, handed_off (another run answers: fenced out, answered elsewhere, deleted).",
    ["agent", "outcome"],
)
MESSAGES_ANSWERED = Counter(
    "threadline_messages_answered",
    "User messages a run answered, by the run's outcome (succeeded or failed).",
    ["agent", "outcome"],
)
RUN_MESSAGES = Histogram(
    "threadline_run_messages",
    "Messages one succeeded run answered: above 1 when messages merged.",
    ["agent"],
    buckets=(1, 2, 3, 5, 10, 20, 50, 100),
)

# -- model calls -----------------------------------------------------------------------------
MODEL_CALL_DURATION = Histogram(
    "threadline_model_call_duration_seconds",
    "Model requests that returned a response, by agent and model.",
    ["agent", "model"],
    buckets=_LATENCY,
)
MODEL_CALL_ERRORS = Counter(
    "threadline_model_call_errors",
    "Model requests that failed, by kind: timeout, provider (an API error), unexpected "
    "(a response the agent could not use), other.",
    ["agent", "model", "kind"],
)

# -- queue -----------------------------------------------------------------------------------
QUEUE_SESSIONS = Gauge(
    "threadline_queue_sessions", "Sessions with messages in flight.", multiprocess_mode="livesum"
)
QUEUE_MESSAGES = Gauge(
    "threadline_queue_messages",
    "Unanswered messages held by the queues (being run or waiting to be).",
    multiprocess_mode="livesum",
)
RUNS_IN_FLIGHT = Gauge(
    "threadline_runs_in_flight",
    "Runs holding a concurrency slot (at most threadline_concurrency_limit).",
    multiprocess_mode="livesum",
)
CONCURRENCY_LIMIT = Gauge(
    "threadline_concurrency_limit",
    "Runs that may hold a concurrency slot now: MAX_CONCURRENT_RUNS, or the adaptive limit "
    "when it is auto (summed over workers).",
    multiprocess_mode="livesum",
)
SLOT_WAITING = Gauge(
    "threadline_slot_waiting_sessions",
    "Sessions ready to run but waiting for a concurrency slot.",
    multiprocess_mode="livesum",
)
SLOT_WAIT = Histogram(
    "threadline_slot_wait_seconds",
    "How long a session that found every concurrency slot taken waited for one.",
    buckets=_LATENCY,
)
INTAKE_WAITING = Gauge(
    "threadline_intake_waiting",
    "Requests waiting for an intake slot (INTAKE_CONCURRENCY) before the server reads them.",
    multiprocess_mode="livesum",
)
CALLERS_WAITING = Gauge(
    "threadline_callers_waiting",
    "Callers (requests, streams) waiting for their message's answer.",
    multiprocess_mode="livesum",
)

# -- process ---------------------------------------------------------------------------------
LOOP_LAG = Histogram(
    "threadline_event_loop_lag_seconds",
    "How late the event loop woke a 10 ms heartbeat: time the loop was blocked or saturated.",
    buckets=_LAG,
)
DB_POOL = Gauge(
    "threadline_db_pool_connections",
    "PostgreSQL pool connections by state: in_use, idle, max (PostgreSQL only).",
    ["state"],
    multiprocess_mode="livesum",
)

# -- Redis coordination ----------------------------------------------------------------------
LEASES_HELD = Gauge(
    "threadline_redis_leases_held",
    "Session leases this server holds in Redis.",
    multiprocess_mode="livesum",
)
TAKEOVERS = Counter(
    "threadline_redis_takeovers",
    "Sessions taken over from another process: dead_owner (callers here were waiting) or "
    "orphan (a lease ran out without a release).",
    ["reason"],
)
# The scale model's pub/sub deliveries (docs/operations.md): what this server publishes and
# what reaches it, by kind: answer (to the process whose caller waits), event (a run event,
# to processes watching its session), nudge (to a session's owner: a new message, a repeat
# to follow, a cancel, a look at the store).
PUBSUB_PUBLISHED = Counter(
    "threadline_redis_pubsub_published",
    "Redis pub/sub messages this server published, by kind: answer, event, nudge.",
    ["kind"],
)
PUBSUB_RECEIVED = Counter(
    "threadline_redis_pubsub_received",
    "Redis pub/sub messages that reached this server, by kind: answer, event, nudge.",
    ["kind"],
)

# -- webhooks --------------------------------------------------------------------------------
WEBHOOK_ATTEMPTS = Counter(
    "threadline_webhook_attempts",
    "Webhook delivery attempts, by the receiver's HTTP status, or timeout / error.",
    ["status"],
)
WEBHOOKS_SENDING = Gauge(
    "threadline_webhooks_sending", "Webhook deliveries being sent now.", multiprocess_mode="livesum"
)


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


def exposition() -> bytes:
    """Every metric in Prometheus' text format: all workers' when several serve."""
    registry: CollectorRegistry = REGISTRY
    if multiprocess_dir() is not None:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return generate_latest(registry)


_LIVE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db$")


def forget_dead_processes(me: int | None = None) -> None:
    """Drop the live gauges of processes that are gone (a worker that was killed and replaced),
    so their last values stop counting; ``me`` also forgets this process's own (shutdown)."""
    path = multiprocess_dir()
    if path is None:
        return
    pids = {int(m.group(1)) for f in os.listdir(path) if (m := _LIVE_FILE.search(f))}
    for pid in pids:
        if pid == me or not _alive(pid):
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Sampler:
    """Sets this process's state gauges once a second from ``read``: a mapping of the numbers
    /debug/metrics shows (``coordinator.metrics()`` and friends), so both agree."""

    def __init__(
        self, read: Callable[[], Mapping[str, Any]], interval_s: float = SAMPLE_INTERVAL_S
    ) -> None:
        self._read = read
        self._interval = interval_s

    def sample(self) -> None:
        numbers = self._read()
        QUEUE_SESSIONS.set(numbers.get("sessions_in_memory", 0))
        QUEUE_MESSAGES.set(numbers.get("queued_messages", 0))
        RUNS_IN_FLIGHT.set(numbers.get("runs_in_flight", 0))
        SLOT_WAITING.set(numbers.get("waiting_for_slot", 0))
        CONCURRENCY_LIMIT.set(numbers.get("concurrency_limit", 0))
        LEASES_HELD.set(numbers.get("leases_held", 0))
        WEBHOOKS_SENDING.set(numbers.get("webhooks_sending", 0))
        pool = numbers.get("pool")
        if pool is not None:
            for state in ("in_use", "idle", "max"):
                DB_POOL.labels(state).set(pool[state])

    async def _tick(self) -> None:
        while True:
            try:
                self.sample()
                forget_dead_processes()
            except Exception:
                log.exception("metrics sampler failed")
            await asyncio.sleep(self._interval)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Sampler]:
        try:
            async with owned(self._tick(), name="threadline-metrics"):
                yield self
        finally:
            # This process's live gauges stop counting once it stops serving.
            forget_dead_processes(me=os.getpid())
