"""The command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.allow_blocking


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "threadline", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_run_answers_once_and_continues_a_named_session(tmp_path: Path) -> None:
    env = {"THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    first = run_cli("run", "echo", "hello cli", "--session", "s1", env=env)
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "echo: hello cli"
    second = run_cli("run", "echo", "again", "--session", "s1", env=env)
    assert second.stdout.strip() == "echo: again"


def test_run_refuses_a_session_of_another_agent(tmp_path: Path) -> None:
    env = {"THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    assert run_cli("run", "echo", "mine", "--session", "s1", env=env).returncode == 0
    other = run_cli("run", "assistant", "hi", "--session", "s1", env=env)
    assert other.returncode == 1
    assert "session_agent_mismatch" in other.stderr


def test_run_unknown_agent_fails_with_a_message(tmp_path: Path) -> None:
    env = {"THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    result = run_cli("run", "nobody", "hi", env=env)
    assert result.returncode == 1
    assert "agent_not_found" in result.stderr


def test_migrate_is_idempotent(tmp_path: Path) -> None:
    env = {"THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db"}
    for _ in range(2):
        result = run_cli("migrate", env=env)
        assert result.returncode == 0, result.stderr
        assert "migrations applied" in result.stdout


def test_migrate_on_postgres(pg_url: str) -> None:
    result = run_cli("migrate", env={"THREADLINE_DATABASE_URL": pg_url})
    assert result.returncode == 0, result.stderr


def test_serve_refuses_bad_configuration(tmp_path: Path) -> None:
    env = {"THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db", "THREADLINE_API_KEY": ""}
    exposed = run_cli("serve", "--host", "0.0.0.0", env=env)
    assert exposed.returncode == 2
    assert "THREADLINE_API_KEY" in exposed.stderr
    bad = run_cli("serve", env={"THREADLINE_HISTORY_LIMIT": "many"})
    assert bad.returncode == 2
    assert "THREADLINE_HISTORY_LIMIT" in bad.stderr


def _without_provider_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}


def test_serve_refuses_a_model_without_its_provider_key(tmp_path: Path) -> None:
    env = {
        **_without_provider_keys(),
        "THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "THREADLINE_MODEL": "openai:gpt-4o",
    }
    result = subprocess.run(
        [sys.executable, "-m", "threadline", "serve", "--port", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "agent 'assistant': model 'openai:gpt-4o' needs OPENAI_API_KEY" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_malformed_openai_compat_model(tmp_path: Path) -> None:
    env = {
        "THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "THREADLINE_MODEL": "openai-compat:llama3",
    }
    result = run_cli("serve", "--port", "0", env=env)
    assert result.returncode == 2, result.stderr
    assert "agent 'assistant': expected openai-compat:MODEL@BASE_URL" in result.stderr


def test_serve_stops_when_an_agent_setup_fails(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {
        "THREADLINE_DATABASE_URL": f"sqlite:///{tmp_path}/cli.db",
        "THREADLINE_AGENTS_MODULE": "tests.broken_agents",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    result = run_cli("serve", "--port", "0", env=env)
    # uvicorn's start-up failure code: the lifespan raised before the server was ready.
    assert result.returncode == 3, result.stderr
    assert (
        "start-up failed: agent 'indexed': setup failed: RuntimeError('index file missing')"
        in result.stderr
    )
