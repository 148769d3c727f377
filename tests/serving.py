"""``threadline serve`` as a child process, for tests whose client blocks (the official
``openai`` SDK's sync client, schemathesis, a browser): the server must not share the test's
thread."""

from __future__ import annotations

import contextlib
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
