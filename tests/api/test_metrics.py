"""``GET /metrics`` of one process: the documented series, counted as requests and runs go.

The metrics live in the process's default registry, shared by every app a test process builds,
so each test compares the counts before and after what it does.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import ModelMessage, ModelResponse
from pydantic_ai.models.function import AgentInfo, FunctionModel

from tests.api.test_api import assert_error
from tests.api.test_webhooks import webhook_settings
from tests.apps import AppFactory
from tests.webhook_receiver import running_receiver
from threadline.agents import AgentSpec

DOCS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
RUN_ROUTE = "/api/v1/agent/{name}/run"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def documented() -> list[str]:
    """The metric names of the table in docs/operations.md, "Metrics"."""
    section = DOCS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(threadline_\w+)` \|", section, re.MULTILINE)


async def scrape(client: httpx.AsyncClient, **headers: str) -> tuple[set[str], Samples]:
    response = await client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families: set[str] = set()
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return families, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, found), v in samples.items() if n == name and wanted <= found)


@pytest.mark.parametrize("backend", ["sqlite", "postgres+redis"], indirect=True)
async def test_metrics_expose_every_documented_series_and_count_requests_and_runs(
    make_app: AppFactory, documented: list[str]
) -> None:
    names = documented
    assert len(names) >= 20, names
    async with make_app() as (client, _):
        _, before = await scrape(client)
        sent = 5
        replies = await asyncio.gather(
            *(
                client.post("/api/v1/agent/echo/run", json={"message_content": f"m{i}"})
                for i in range(sent)
            )
        )
        assert [r.status_code for r in replies] == [200] * sent
        run_id = replies[0].json()["run_id"]
        assert (await client.get(f"/api/v1/runs/{run_id}")).status_code == 200
        assert (await client.get("/no/such/path")).status_code == 404
        families, after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    # prometheus-client's parser names a counter's family without its _total.
    assert {n.removesuffix("_total") for n in names} <= families
    posted = {"method": "POST", "route": RUN_ROUTE, "status": "200"}
    assert delta("threadline_http_requests_total", **posted) == sent
    assert delta("threadline_http_request_duration_seconds_count", **posted) == sent
    fetched = {"method": "GET", "route": "/api/v1/runs/{run_id}", "status": "200"}
    assert delta("threadline_http_requests_total", **fetched) == 1
    assert delta("threadline_http_requests_total", route="unmatched", status="404") == 1
    assert delta("threadline_runs_started_total", agent="echo") == sent
    assert delta("threadline_runs_finished_total", agent="echo", outcome="succeeded") == sent
    assert delta("threadline_messages_answered_total", agent="echo", outcome="succeeded") == sent
    assert delta("threadline_run_messages_sum", agent="echo") == sent
    assert delta("threadline_model_call_duration_seconds_count", agent="echo") == sent
    assert value(after, "threadline_callers_waiting") == 0
    assert value(after, "threadline_event_loop_lag_seconds_count") > 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_every_response_echoes_the_request_id_or_a_new_one(make_app: AppFactory) -> None:
    async with make_app() as (client, _):
        given = await client.get("/health", headers={"X-Request-Id": "trace-42"})
        assert given.headers["x-request-id"] == "trace-42"
        made = await client.get("/health", headers={"X-Request-Id": "x" * 129})
        other = await client.get("/no/such/path")
        assert len({made.headers["x-request-id"], other.headers["x-request-id"], "x" * 129}) == 3


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_metrics_need_the_api_key_when_one_is_set(make_app: AppFactory) -> None:
    async with make_app(api_key="s3cret") as (client, _):
        assert_error(await client.get("/metrics"), 401, "unauthorized")
        await scrape(client, **{"X-API-Key": "s3cret"})


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_an_open_stream_is_counted_until_it_ends(make_server: AppFactory) -> None:
    async with make_server(echo_delay_ms=1000) as (client, _):
        body = {"message_content": "slow", "stream": True}
        async with client.stream("POST", "/api/v1/agent/echo/run", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            assert (await anext(lines)) == "id: 0"  # message.accepted: the message is stored
            _, during = await scrape(client)
            assert value(during, "threadline_http_streams_open", route=RUN_ROUTE) == 1
            assert value(during, "threadline_callers_waiting") == 1
            async for _ in lines:
                pass
        _, after = await scrape(client)
        while value(after, "threadline_http_streams_open", route=RUN_ROUTE) != 0:
            await asyncio.sleep(0.01)  # the gauge drops once the response has ended
            _, after = await scrape(client)
        assert value(after, "threadline_callers_waiting") == 0


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_model_errors_failed_runs_and_webhook_attempts_are_counted(
    make_app: AppFactory,
) -> None:
    async def broken(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise UnexpectedModelBehavior("the provider sent nonsense")

    agent = AgentSpec(name="broken", model=FunctionModel(broken, model_name="nonsense"))
    async with (
        running_receiver(["fail", "ok"]) as receiver,
        make_app([agent], **webhook_settings()) as (client, _),
    ):
        _, before = await scrape(client)
        failed = await client.post("/api/v1/agent/broken/run", json={"message_content": "x"})
        assert_error(failed, 502, "model_error")
        body = {"message_content": "y", "webhook_url": receiver.url()}
        assert (await client.post("/api/v1/agent/echo/run", json=body)).status_code == 200
        await receiver.next()
        await receiver.next()
        _, after = await scrape(client)
        while value(after, "threadline_webhook_attempts_total", status="200") == value(
            before, "threadline_webhook_attempts_total", status="200"
        ):
            await asyncio.sleep(0.01)  # counted once the sender has read the status
            _, after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    labels = {"agent": "broken", "model": "nonsense"}
    assert delta("threadline_model_call_errors_total", kind="unexpected", **labels) == 1
    assert delta("threadline_model_call_duration_seconds_count", **labels) == 0
    assert delta("threadline_runs_finished_total", agent="broken", outcome="failed") == 1
    assert delta("threadline_messages_answered_total", agent="broken", outcome="failed") == 1
    assert delta("threadline_webhook_attempts_total", status="500") == 1
    assert delta("threadline_webhook_attempts_total", status="200") == 1
