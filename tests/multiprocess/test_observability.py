"""``/metrics`` and the logs of one real server running two uvicorn workers (Redis-coordinated).

Under a small load (bursts that merge, single messages, spread over both workers by the shared
socket) the counters scraped from either worker add up to what the test sent: prometheus-client's
multiprocess mode sums the workers. Every line both workers log is JSON with the same fields.
"""

from __future__ import annotations

import asyncio
import functools
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from tests.multiprocess.conftest import (
    MakeSession,
    Server,
    server_env,
    start_servers,
    stored,
    wait_until,
)
from tests.redis_topologies import Topology

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.postgres, pytest.mark.redis]

RUN_ROUTE = "/api/v1/agent/{name}/run"
POOL_MAX_SIZE = 5  # server_env's, per worker
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

REDIS_MODES = ("standalone", "cluster", "sentinel")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(pg_dsn: str, topology: Topology, workdir: Path) -> AsyncIterator[Server]:
    env = server_env(pg_dsn, topology, workers=2, log_format="json")
    (started,) = await start_servers(1, env, workdir, "observed")
    try:
        # /health answered means one worker serves; the other may still be starting. Each
        # reports its pool as soon as it serves, and the scrape adds both.
        async with httpx.AsyncClient(base_url=started.url, timeout=10) as client:
            await wait_until(lambda: _pools_reported(client, workers=2))
        yield started
    finally:
        await started.child.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def client(server: Server) -> AsyncIterator[httpx.AsyncClient]:
    # No keep-alive: each request is a new connection, which either worker may accept.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as opened:
        yield opened
    assert server.child.running, server.child.logs()


def send(
    client: httpx.AsyncClient, agent: str, text: str, session_id: uuid.UUID | None = None
) -> asyncio.Task[httpx.Response]:
    body: dict[str, Any] = {"message_content": text}
    if session_id is not None:
        body["session_id"] = str(session_id)
    return asyncio.create_task(client.post(f"/api/v1/agent/{agent}/run", json=body))


async def scrape(client: httpx.AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


@pytest.mark.timeout(90)
async def test_counters_of_two_workers_add_up_to_the_load_sent(
    server: Server, client: httpx.AsyncClient, db: asyncpg.Pool, make_session: MakeSession
) -> None:
    before = await scrape(client)
    bursts, singles = 10, 10

    async def burst(k: int) -> list[httpx.Response]:
        # Part 1's run cannot finish (tests/mp_agents.py): part 2 supersedes it, part 3 the
        # next, and one run answers all three.
        sid = (await make_session("burst")).id
        callers: list[asyncio.Task[httpx.Response]] = []
        for i in (1, 2, 3):
            callers.append(send(client, "burst", f"part {i}/3 of m{k}-{sid}", sid))
            await wait_until(functools.partial(stored, db, sid, i), callers)
        return list(await asyncio.gather(*callers))

    answered = await asyncio.gather(
        *(burst(k) for k in range(bursts)),
        asyncio.gather(*(send(client, "echo", f"single {k}") for k in range(singles))),
    )
    responses = [r for group in answered for r in group]
    sent = bursts * 3 + singles
    assert len(responses) == sent
    assert [r.status_code for r in responses] == [200] * sent, [r.text for r in responses]
    runs = {r.json()["run_id"] for r in responses}
    assert len(runs) == bursts + singles

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    posted = {"method": "POST", "route": RUN_ROUTE, "status": "200"}
    after = await scrape(client)
    # A request is counted once its response has gone out: the last may lag the reply.
    while delta("threadline_http_requests_total", **posted) < sent:
        await asyncio.sleep(0.05)
        after = await scrape(client)

    assert delta("threadline_http_requests_total", **posted) == sent
    assert delta("threadline_http_request_duration_seconds_count", **posted) == sent
    started = delta("threadline_runs_started_total")
    succeeded = delta("threadline_runs_finished_total", outcome="succeeded")
    superseded = delta("threadline_runs_finished_total", outcome="superseded", agent="burst")
    assert succeeded == len(runs)
    assert superseded >= bursts  # every burst's first run, at least
    # A run may also be handed off: its process lost the session's lease (a renewal late
    # under load; seen once in cluster mode on CI) and another process answered its messages.
    # Every run that started still finished with a counted ending.
    handed_off = delta("threadline_runs_finished_total", outcome="handed_off")
    assert started == delta("threadline_runs_finished_total") == succeeded + superseded + handed_off
    assert delta("threadline_runs_started_total", agent="echo") == singles
    assert delta("threadline_messages_answered_total", outcome="succeeded") == sent
    assert delta("threadline_run_messages_sum", agent="burst") == bursts * 3
    assert delta("threadline_run_messages_count", agent="burst") == bursts
    assert delta("threadline_run_messages_sum", agent="echo") == singles
    # Completed model calls: one per succeeded run (superseded ones were cancelled mid-call).
    assert delta("threadline_model_call_duration_seconds_count", agent="burst") == bursts
    assert delta("threadline_model_call_duration_seconds_count", agent="echo") == singles
    assert delta("threadline_model_call_errors_total") == 0
    assert value(after, "threadline_callers_waiting") == 0
    # Gauges of both workers add up: each has a pool of POOL_MAX_SIZE.
    assert value(after, "threadline_db_pool_connections", state="max") == 2 * POOL_MAX_SIZE
    assert value(after, "threadline_event_loop_lag_seconds_count") > 0
    assert value(after, "threadline_slot_wait_seconds_count") >= 0


@pytest.mark.timeout(60)
async def test_both_workers_write_one_json_line_per_request_with_its_ids(
    server: Server, client: httpx.AsyncClient
) -> None:
    sent: dict[str, httpx.Response] = {}

    async def request(rid: str) -> None:
        body = {"message_content": rid}
        response = await client.post(
            "/api/v1/agent/echo/run", json=body, headers={"X-Request-Id": rid}
        )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == rid
        sent[rid] = response

    def request_lines() -> dict[str, dict[str, Any]]:
        lines = [json.loads(line) for line in server.child.output if line.strip()]
        return {
            line["request_id"]: line for line in lines if line["logger"] == "threadline.requests"
        }

    # Until both workers have answered some: the kernel decides which accepts a connection.
    while len({request_lines()[rid]["pid"] for rid in sent if rid in request_lines()}) < 2:
        await asyncio.gather(*(request(f"obs-{uuid.uuid4().hex}") for _ in range(10)))
        await asyncio.sleep(0.05)
    await wait_until(lambda: _all_logged(request_lines, sent))

    logged = request_lines()
    for rid, response in sent.items():
        line = logged[rid]
        assert line["method"] == "POST"
        assert line["route"] == RUN_ROUTE
        assert line["status"] == 200
        assert line["latency_ms"] > 0
        assert line["level"] == "INFO"
        assert line["session_id"] == response.json()["session_id"]
        assert line["run_id"] == response.json()["run_id"]
        assert line["message"].startswith(f"POST {RUN_ROUTE} 200 ")
    assert sum(1 for line in logged.values() if line["request_id"] in sent) == len(sent)
    # Every line either worker (or the supervisor) wrote is JSON, INFO lines included: the
    # run lifecycle, uvicorn's start-up.
    everything = [json.loads(line) for line in server.child.output if line.strip()]
    assert any(line["logger"] == "uvicorn.error" for line in everything)
    assert any(line.get("event") == "run.started" for line in everything)
    runs = [line for line in everything if line.get("event") == "run.succeeded"]
    assert {line["run_id"] for line in runs} >= {r.json()["run_id"] for r in sent.values()}
    assert len({line["pid"] for line in everything}) >= 3  # the supervisor and two workers


async def _pools_reported(client: httpx.AsyncClient, workers: int) -> bool:
    found = value(await scrape(client), "threadline_db_pool_connections", state="max")
    return found == workers * POOL_MAX_SIZE


async def _all_logged(lines: Any, sent: dict[str, httpx.Response]) -> bool:
    return set(sent) <= set(lines())
