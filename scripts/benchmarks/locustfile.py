"""Locust scenarios for threadline's agent route, for those who prefer Locust to our bench.

Start a server first (``THREADLINE_ECHO_DELAY_MS=50 threadline serve``), then, bounded in time:

    locust -f scripts/benchmarks/locustfile.py --host http://127.0.0.1:8000 \\
        --headless --users 200 --spawn-rate 50 --run-time 30s AgentRunUser

    locust -f scripts/benchmarks/locustfile.py --host http://127.0.0.1:8000 \\
        --headless --users 60 --spawn-rate 20 --run-time 30s BurstUser

``AgentRunUser`` sends one message to a new session per request; ``BurstUser`` sends
``BURST_SIZE`` (env ``THREADLINE_BENCH_BURST``, default 3) messages to one new session at once,
and fails any reply that does not echo its own prompt. Each user waits for its answer before
the next request, as ``agent_run_bench.py`` does. Locust's own percentiles come from a
histogram with coarse buckets; for raw per-request latencies use ``agent_run_bench.py``.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

import gevent
from locust import FastHttpUser, task
from locust.exception import StopUser

ROUTE = "/api/v1/agent/echo/run"
BURST_SIZE = int(os.environ.get("THREADLINE_BENCH_BURST", "3"))
_counter = itertools.count()


def _problem(body: Any, prompt: str) -> str | None:
    if not isinstance(body, dict):
        return "body is not a JSON object"
    if prompt not in str(body.get("message", "")):
        return f"reply does not echo {prompt!r}"
    if body.get("success") is not True or "session_id" not in body or "run_id" not in body:
        return "missing success, session_id or run_id"
    return None


class _AgentUser(FastHttpUser):
    abstract = True
    concurrency = 1
    network_timeout = 60.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.tag = uuid.uuid4().hex[:8]

    def send(self, session: str, prompt: str) -> None:
        payload = {"message_content": prompt, "session_name": session, "user_id": "locust"}
        with self.client.post(ROUTE, json=payload, name=ROUTE, catch_response=True) as response:
            if not 200 <= (response.status_code or 0) < 300:
                response.failure(f"status {response.status_code}")
                return
            try:
                problem = _problem(response.json(), prompt)
            except ValueError:
                problem = "invalid JSON"
            if problem is not None:
                response.failure(problem)


class AgentRunUser(_AgentUser):
    """One new session per request."""

    @task
    def new_session(self) -> None:
        session = f"locust-{self.tag}-{next(_counter)}"
        self.send(session, f"<{session}>")


class BurstUser(_AgentUser):
    """``BURST_SIZE`` messages to one new session at once, like a user typing fast."""

    concurrency = BURST_SIZE

    @task
    def burst(self) -> None:
        session = f"locust-{self.tag}-{next(_counter)}"
        greenlets = [
            gevent.spawn(self.send, session, f"<{session}:{k}>") for k in range(BURST_SIZE)
        ]
        gevent.joinall(greenlets, timeout=self.network_timeout + 5)
        if not all(g.dead for g in greenlets):
            raise StopUser()
