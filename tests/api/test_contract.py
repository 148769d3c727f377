"""The OpenAPI contract holds: schemathesis fuzzes every operation of a real server process,
on SQLite and on PostgreSQL, with every check it has. Zero server errors, zero statuses or
bodies the document does not declare.

Deterministic (``--generation-deterministic``) and bounded (a fixed number of examples per
operation), so it finds the same things on every run and stays within about a minute.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apps import AppFactory
from tests.serving import serving

EXAMPLES_PER_OPERATION = 15


@pytest.fixture(params=["sqlite", "postgres", "sqlite+webhooks"])
def server_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A ``threadline serve`` process with the built-in echo agent, on the given store; with
    webhooks, request URLs to 127.0.0.1 are allowed (the document's pattern says so)."""
    if request.param == "postgres":
        database = str(request.getfixturevalue("pg_url"))
    else:
        database = f"sqlite:///{tmp_path}/contract.db"
    settings = {"THREADLINE_DATABASE_URL": database}
    if request.param.endswith("+webhooks"):
        settings["THREADLINE_WEBHOOK_SECRET"] = "contract-secret"
        settings["THREADLINE_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
        # Fuzzed URLs point at ports nobody listens on: give up on them quickly.
        settings["THREADLINE_WEBHOOK_MAX_AGE_S"] = "1"
    log = tmp_path / "server.log"
    with serving(log, **settings) as url:
        yield url
    # A fault the fuzzer provoked but the response hid would still be in the log.
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.allow_blocking
def test_every_operation_keeps_the_contract(server_url: str, tmp_path: Path) -> None:
    # The CLI rather than the pytest plugin: it runs every phase (the schema's examples, the
    # boundary values of the coverage phase, fuzzing, and stateful sequences that follow the
    # links between operations), valid and invalid data alike, with every check.
    argv = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server_url}/openapi.json",
        "--checks", "all",
        "--mode", "all",
        "--max-examples", str(EXAMPLES_PER_OPERATION),
        "--generation-deterministic",
        "--workers", "1",
        "--no-color",
    ]  # fmt: skip
    # Refusals that rest on earlier requests or on header and body together (contract_hooks.py).
    env = {**os.environ, "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("contract_hooks.py"))}
    result = subprocess.run(
        argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
async def test_the_document_declares_errors_and_the_key_only_when_set(
    make_app: AppFactory,
) -> None:
    async with make_app() as (client, _):
        open_doc = (await client.get("/openapi.json")).json()
    async with make_app(api_key="s3cret") as (client, _):
        keyed = await client.get("/openapi.json", headers={"X-API-Key": "s3cret"})
        keyed_doc = keyed.json()
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    run = open_doc["paths"]["/api/v1/agent/{name}/run"]["post"]
    assert set(run["responses"]) == {
        "200", "202", "400", "403", "404", "409", "413", "422", "429", "502", "503", "504"
    }  # fmt: skip
    for status, response in run["responses"].items():
        if status not in ("200", "202"):
            assert response["content"]["application/json"]["schema"] == error_ref
    assert "HTTPValidationError" not in open_doc["components"]["schemas"]
    assert "security" not in run
    assert "securitySchemes" not in open_doc["components"]
    keyed_run = keyed_doc["paths"]["/api/v1/agent/{name}/run"]["post"]
    assert keyed_run["security"] == [{"APIKeyHeader": []}]
    assert keyed_run["responses"]["401"]["content"]["application/json"]["schema"] == error_ref
    # With keys, a user key naming another user is 403; a key past its rate limit is 429.
    assert "user key" in keyed_run["responses"]["403"]["description"]
    assert "Retry-After" in keyed_run["responses"]["429"]["headers"]
    # /health is never behind the key, nor refused to other machines.
    assert "401" not in keyed_doc["paths"]["/health"]["get"]["responses"]
    assert "403" not in open_doc["paths"]["/health"]["get"]["responses"]
