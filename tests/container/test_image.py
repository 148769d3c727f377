"""Build the Dockerfile and run the image against the test PostgreSQL and Redis.

Needs a container engine that can run a container here: ``THREADLINE_TEST_CONTAINER_ENGINE``
(default: ``podman``, else ``docker``, on PATH). The base image comes from a registry unless
``THREADLINE_TEST_PYTHON_IMAGE`` names a local one (``scripts/container/debian_python_image.sh``
builds one from Debian's archive, for machines that reach no registry). Where the engine cannot
run a container or the base image cannot be had, the test is skipped with the engine's words.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.multiprocess.conftest import free_port

pytestmark = [pytest.mark.container, pytest.mark.allow_blocking, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "python:3.11-slim-bookworm"
TAG = "localhost/threadline:test"
KEY = "container-test-key"


def engine_or_skip() -> str:
    engine = os.environ.get("THREADLINE_TEST_CONTAINER_ENGINE") or next(
        (name for name in ("podman", "docker") if shutil.which(name)), None
    )
    if engine is None:
        pytest.skip("no container engine: neither podman nor docker is on PATH")
    return engine


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def image() -> tuple[str, str]:
    engine = engine_or_skip()
    base = os.environ.get("THREADLINE_TEST_PYTHON_IMAGE") or DEFAULT_BASE
    if run(engine, "image", "inspect", base).returncode != 0:
        pulled = run(engine, "pull", base, timeout=300)
        if pulled.returncode != 0:
            pytest.skip(
                f"cannot pull {base!r} ({pulled.stderr.strip()[-300:]}); set "
                "THREADLINE_TEST_PYTHON_IMAGE to a local base image "
                "(scripts/container/debian_python_image.sh builds one)"
            )
    probe = run(engine, "run", "--rm", base, "python3", "-c", "pass")
    if probe.returncode != 0:
        pytest.skip(f"{engine} cannot run a container here: {probe.stderr.strip()[-500:]}")
    build = run(
        engine,
        "build",
        "--format=docker" if engine == "podman" else "--quiet",
        "--build-arg",
        f"PYTHON_IMAGE={base}",
        "--tag",
        TAG,
        str(ROOT),
        timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    return engine, TAG


def wait_healthy(engine: str, name: str, url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = run(engine, "inspect", "--format", "{{.State.Running}}", name).stdout.strip()
        if state != "true":
            logs = run(engine, "logs", name)
            pytest.fail(f"container exited:\n{logs.stdout}{logs.stderr}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url}/health did not answer within 60 s")


def test_image_refuses_to_serve_without_an_api_key(image: tuple[str, str]) -> None:
    engine, tag = image
    result = run(engine, "run", "--rm", tag)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "is not loopback and neither THREADLINE_API_KEY" in result.stderr


def test_image_runs_as_a_non_root_user(image: tuple[str, str]) -> None:
    engine, tag = image
    result = run(engine, "run", "--rm", "--entrypoint", "id", tag, "-u")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "10001"


def test_image_serves_two_workers_on_postgres_and_redis(
    image: tuple[str, str], pg_url: str, redis_url: str
) -> None:
    engine, tag = image
    port = free_port()
    name = f"threadline-test-{port}"
    started = run(
        engine,
        "run",
        "--detach",
        "--name",
        name,
        # The test services listen on the host's loopback.
        "--network=host",
        "--env",
        f"THREADLINE_PORT={port}",
        "--env",
        f"THREADLINE_API_KEY={KEY}",
        "--env",
        "THREADLINE_WORKERS=2",
        "--env",
        f"THREADLINE_DATABASE_URL={pg_url}",
        "--env",
        f"THREADLINE_REDIS_URL={redis_url}",
        tag,
    )
    assert started.returncode == 0, started.stderr
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(engine, name, url)
        assert httpx.get(f"{url}/ready", timeout=10).status_code == 200
        body = {"message_content": "hello container", "session_name": f"c-{port}"}
        refused = httpx.post(f"{url}/api/v1/agent/echo/run", json=body, timeout=30)
        assert refused.status_code == 401, refused.text
        answered = httpx.post(
            f"{url}/api/v1/agent/echo/run", json=body, headers={"X-API-Key": KEY}, timeout=30
        )
        assert answered.status_code == 200, answered.text
        assert answered.json()["message"] == "echo: hello container"
    finally:
        run(engine, "rm", "--force", name)
