"""The OpenAPI contract holds: schemathesis fuzzes every operation of a real server process,
on SQLite and on PostgreSQL, with every check it has. Zero server errors, zero statuses or
bodies the document does not declare.

Deterministic (``derandomize``) and bounded (a fixed number of examples per operation), so it
finds the same things on every run and stays well under a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.apps import AppFactory
from tests.multiprocess.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_PER_OPERATION = 25
STARTUP_S = 30.0


@pytest.fixture(params=["sqlite", "postgres"])
def server_url(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[str]:  # pragma: no cover - exercised by the contract test
    """A ``threadline serve`` process with the built-in echo agent, on the given store."""
    if request.param == "postgres":
        database = str(request.getfixturevalue("pg_url"))
    else:
        database = f"sqlite:///{tmp_path}/contract.db"
    port = free_port()
    env = {
        **os.environ,
        "THREADLINE_DATABASE_URL": database,
        "THREADLINE_PORT": str(port),
        "THREADLINE_GC_TUNING": "0",
    }
    env.pop("THREADLINE_API_KEY", None)
    env.pop("THREADLINE_REDIS_URL", None)
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "threadline", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(20)
    # A fault the fuzzer provoked but the response hid would still be in the log.
    assert "Traceback" not in log.read_text(), log.read_text()


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)  # polls another process; bounded by the deadline
    pytest.fail(f"server did not answer within {STARTUP_S}s:\n{log.read_text()}")


@pytest.mark.allow_blocking
def test_every_operation_keeps_the_contract(server_url: str) -> None:
    # No ``servers`` in the document: requests go to the host the schema came from.
    schema = schemathesis.openapi.from_url(f"{server_url}/openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    for operation in operations:
        # Valid requests and invalid ones: both must get a declared status and body.
        cases = st.one_of(
            operation.as_strategy(GenerationMode.POSITIVE),
            operation.as_strategy(GenerationMode.NEGATIVE),
        )

        @given(case=cases)
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            derandomize=True,
            database=None,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        )
        def keeps_the_contract(case: schemathesis.Case) -> None:
            case.call_and_validate()

        try:
            keeps_the_contract()
        except Exception as exc:  # report every operation's failure, not just the first
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)


async def test_the_document_declares_errors_and_the_key_only_when_set(
    make_app: AppFactory,
) -> None:
    async with make_app() as (client, _):
        open_doc = (await client.get("/openapi.json")).json()
    async with make_app(api_key="s3cret") as (client, _):
        keyed_doc = (await client.get("/openapi.json")).json()
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    run = open_doc["paths"]["/api/v1/agent/{name}/run"]["post"]
    assert set(run["responses"]) == {
        "200", "400", "404", "409", "413", "422", "429", "502", "503", "504"
    }  # fmt: skip
    for status, response in run["responses"].items():
        if status != "200":
            assert response["content"]["application/json"]["schema"] == error_ref
    assert "HTTPValidationError" not in open_doc["components"]["schemas"]
    assert "security" not in run
    assert "securitySchemes" not in open_doc["components"]
    keyed_run = keyed_doc["paths"]["/api/v1/agent/{name}/run"]["post"]
    assert keyed_run["security"] == [{"APIKeyHeader": []}]
    assert keyed_run["responses"]["401"]["content"]["application/json"]["schema"] == error_ref
    # /health is never behind the key.
    assert "401" not in keyed_doc["paths"]["/health"]["get"]["responses"]
