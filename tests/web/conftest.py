"""The chat page in a real browser: Debian's chromium driven by Playwright's sync API, against
``threadline serve`` processes (SQLite, the echo model).

Playwright's own browser downloads are never used: the tests launch ``/usr/bin/chromium``
(``.ci/run`` installs it). Every browser context refuses requests that leave the server it
tests, so a page that needs the network fails here. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    Playwright,
    Route,
    sync_playwright,
)

from tests.conftest import REQUIRE_SERVICES
from tests.multiprocess.conftest import ROOT, free_port

CHROMIUM = Path(os.environ.get("THREADLINE_TEST_CHROMIUM", "/usr/bin/chromium"))
ARTIFACTS = ROOT / "test-artifacts"
START_TIMEOUT_S = 20.0
# Each echo reply takes this long, streamed in word chunks over that time.
ECHO_DELAY_MS = 1500


@dataclass
class WebServer:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-5000:]


@contextlib.contextmanager
def serving(directory: Path, **settings: object) -> Iterator[WebServer]:
    """``threadline serve`` on a free port with these settings, stopped on exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["THREADLINE_DATABASE_URL"] = f"sqlite:///{directory}/web-{port}.db"
    env.update({f"THREADLINE_{k.upper()}": str(v) for k, v in settings.items()})
    log = directory / f"server-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "threadline", "serve", "--port", str(port)],
            env=env,
            cwd=directory,  # no .env file of the checkout is read
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = WebServer(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_healthy(server)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """One server for a module's tests; each browser context is a new user, so they do not
    meet. The echo model's delay keeps a run in flight long enough to merge or cancel."""
    with serving(tmp_path_factory.mktemp("web"), echo_delay_ms=ECHO_DELAY_MS) as server:
        yield server


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., WebServer]]:
    """Start a server of the test's own (other settings); stopped after the test."""
    with contextlib.ExitStack() as stack:
        yield lambda **settings: stack.enter_context(serving(tmp_path, **settings))


def _wait_healthy(server: WebServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited during start-up:\n{server.output()}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the server did not answer /health in {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM))
    yield browser
    browser.close()


@dataclass
class Offline:
    """The requests a context refused because they left the server under test."""

    refused: list[str]


@pytest.fixture
def offline() -> Offline:
    return Offline([])


@dataclass
class Tab:
    """A browser context (its own storage) with one page, and what the page reported."""

    context: BrowserContext
    page: Page
    errors: list[str]


@pytest.fixture
def make_tab(browser: Browser, offline: Offline) -> Iterator[Callable[..., Tab]]:
    """A fresh context and page, cut off from everything but ``server``."""
    tabs: list[Tab] = []

    def make(server: WebServer, **options: Any) -> Tab:
        context = browser.new_context(base_url=server.url, **options)

        def only_the_server(route: Route) -> None:
            if route.request.url.startswith(server.url + "/"):
                route.continue_()
            else:
                offline.refused.append(route.request.url)
                route.abort()

        context.route("**/*", only_the_server)
        tab = Tab(context, context.new_page(), [])
        tab.page.on("pageerror", lambda error: tab.errors.append(str(error)))
        tab.page.on(
            "console",
            lambda message: tab.errors.append(message.text) if message.type == "error" else None,
        )
        tabs.append(tab)
        return tab

    yield make
    for tab in tabs:
        tab.context.close()
    assert offline.refused == [], f"the page reached out of its server: {offline.refused}"


def screenshot(page: Page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=path)
    return path


@pytest.fixture
def backend() -> str:
    """The page's HTTP tests (test_assets.py) need one store, not each of them."""
    return "sqlite"
