"""The command line, run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.multiprocess.conftest import free_port
from tests.serving import wait_healthy

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


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    from threadline.keyfile import hash_key, read_keys

    path = tmp_path / "keys.toml"
    env = {"THREADLINE_API_KEYS_FILE": str(path)}
    created = run_cli("keys", "create", "--user", "alice", "--rate", "60", "--name", "a1", env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("tl_")
    assert "shown only now" in created.stderr
    admin = run_cli("keys", "create", "--admin", "--file", str(path), env={})
    assert admin.returncode == 0, admin.stderr
    [alice, root] = read_keys(path)
    # The file holds the hash, never the key.
    assert (alice.name, alice.role, alice.user_id, alice.rate_limit_per_min) == (
        "a1", "user", "alice", 60
    )  # fmt: skip
    assert alice.hash == hash_key(key)
    assert key not in path.read_text()
    assert root.role == "admin"
    assert root.user_id is None
    listed = run_cli("keys", "list", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "a1\tuser alice, 60/min" in listed.stdout
    assert f"{root.name}\tadmin, no rate limit" in listed.stdout
    assert key not in listed.stdout
    revoked = run_cli("keys", "revoke", "a1", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert [k.name for k in read_keys(path)] == [root.name]
    again = run_cli("keys", "revoke", "a1", env=env)
    assert again.returncode == 2
    assert "no key named 'a1'" in again.stderr


def test_keys_create_refuses_what_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "keys.toml"
    env = {"THREADLINE_API_KEYS_FILE": str(path)}
    for args in ((), ("--user", "u", "--admin")):
        refused = run_cli("keys", "create", *args, env=env)
        assert refused.returncode == 2
        assert "exactly one of --user ID and --admin" in refused.stderr
    assert run_cli("keys", "create", "--user", "u", "--name", "k", env=env).returncode == 0
    duplicate = run_cli("keys", "create", "--user", "v", "--name", "k", env=env)
    assert duplicate.returncode == 2
    assert "a key named 'k' exists already" in duplicate.stderr
    nowhere = run_cli("keys", "list", env={"THREADLINE_API_KEYS_FILE": ""})
    assert nowhere.returncode == 2
    assert "--file PATH or THREADLINE_API_KEYS_FILE" in nowhere.stderr


def test_keys_file_may_be_json(tmp_path: Path) -> None:
    import json

    path = tmp_path / "keys.json"
    created = run_cli("keys", "create", "--user", "u", "--file", str(path), env={})
    assert created.returncode == 0, created.stderr
    [entry] = json.loads(path.read_text())["keys"]
    assert entry["user_id"] == "u"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


LOCAL_AGENTS = """
from threadline.agents import AgentSpec

AGENTS = [AgentSpec(name="local", description="from here", model="threadline:echo")]
"""


def console_script() -> str:
    # The installed `threadline` script, as users run it: its sys.path starts with the venv's
    # bin directory. (`python -m threadline` puts the working directory first by itself.)
    script = Path(sys.executable).with_name("threadline")
    assert script.exists(), f"{script} is missing: the project is not installed in this venv"
    return str(script)


def without_pythonpath(**env: str) -> dict[str, str]:
    inherited = {
        k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("THREADLINE_")
    }
    return {**inherited, **env}


def test_agents_module_in_the_working_directory_needs_no_pythonpath(tmp_path: Path) -> None:
    (tmp_path / "my_agents.py").write_text(LOCAL_AGENTS)
    env = without_pythonpath(
        THREADLINE_DATABASE_URL=f"sqlite:///{tmp_path}/cli.db",
        THREADLINE_AGENTS_MODULE="my_agents",
    )
    result = subprocess.run(
        [console_script(), "run", "local", "from here"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "echo: from here"


def test_agents_module_in_the_working_directory_reaches_every_worker(
    tmp_path: Path, pg_url: str, redis_url: str
) -> None:
    # uvicorn spawns its workers: they must find the module the way the supervisor did.
    (tmp_path / "my_agents.py").write_text(LOCAL_AGENTS)
    port = free_port()
    env = without_pythonpath(
        THREADLINE_DATABASE_URL=pg_url,
        THREADLINE_REDIS_URL=redis_url,
        THREADLINE_AGENTS_MODULE="my_agents",
        THREADLINE_PORT=str(port),
        THREADLINE_WORKERS="2",
    )
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [console_script(), "serve"], cwd=tmp_path, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, log)
        # Each connection may land on either worker; both must have the agent.
        for _ in range(10):
            with httpx.Client(timeout=10) as client:
                agents = client.get(f"{url}/api/v1/agents").json()
            assert "local" in {agent["name"] for agent in agents}, agents
    finally:
        process.terminate()
        process.wait(30)
