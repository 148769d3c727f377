"""``threadline serve`` as a child process, for tests whose client blocks (the official
``openai`` SDK's sync client, schemathesis, a browser): the server must not share the test's
thread."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.multiprocess.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
STARTUP_S = 30.0


@contextlib.contextmanager
def serving(log: Path, **settings: str) -> Iterator[str]:
    """Serve on a free port with ``settings`` (``THREADLINE_*`` names); yield the base URL.

    No setting comes from the test's own environment: only those given, so a developer's
    shell cannot change what a test serves.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    # Agents modules of the tests (THREADLINE_AGENTS_MODULE=tests....) import from here.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(THREADLINE_PORT=str(port), THREADLINE_GC_TUNING="0", **settings)
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
        wait_healthy(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(20)


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
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


_MODULES_LOADED = """
import asyncio, json, sys, httpx
from threadline.app import create_app
from threadline.config import Settings

database, model, prefixes = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
inside = tuple(p + "." for p in prefixes)

def loaded():
    return sorted(m for m in sys.modules if m in prefixes or m.startswith(inside))

async def main():
    settings = Settings(_env_file=None, database_url=database, model=model, gc_tuning=False)
    app = create_app(settings)
    seen = {}
    async with app.router.lifespan_context(app):
        seen["started"] = loaded()  # every agent's model is built by now
        if model == "threadline:echo":
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                reply = await client.post("/api/v1/agent/echo/run", json={"message_content": "hi"})
                assert reply.status_code == 200, reply.text
            seen["answered"] = loaded()
    seen["stopped"] = loaded()
    print(json.dumps(seen))

asyncio.run(main())
"""


def modules_an_app_loads(
    database: str, model: str, prefixes: tuple[str, ...], env: dict[str, str] | None = None
) -> dict[str, list[str]]:
    """The modules named by ``prefixes`` (or inside them) that a fresh process running
    ``create_app`` on ``model`` has loaded once ``started``, on the echo model once it has
    ``answered`` one message, and once ``stopped``. ``env``: the process's environment, if
    not the test's."""
    done = subprocess.run(
        [sys.executable, "-c", _MODULES_LOADED, database, model, *prefixes],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    seen: dict[str, list[str]] = json.loads(done.stdout)
    return seen
