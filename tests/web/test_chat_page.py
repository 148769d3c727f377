"""The chat page in Debian's chromium: streaming, cancel-and-merge, history, cancel, failure,
the API-key prompt, a phone screen in dark mode, and Swagger UI without network.

The echo model takes ``ECHO_DELAY_MS`` per reply, streamed in word chunks over that time, so a
run is in flight long enough to be seen, merged into, or cancelled. Every wait is on a DOM state
(Playwright's ``expect`` retries until it holds), never a sleep.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from playwright.sync_api import Locator, Page, expect

from tests.web.conftest import Tab, WebServer, screenshot

pytestmark = [pytest.mark.web, pytest.mark.allow_blocking]

# Longer than a reply takes, well under the test's timeout.
REPLY_TIMEOUT_MS = 10_000
FAILING_TOOL_CALL = '/call current_time {"timezone_offset_hours": 99}'

ServerFactory = Callable[..., WebServer]
TabFactory = Callable[..., Tab]


def open_page(tab: Tab, path: str = "/") -> Page:
    tab.page.goto(path)
    expect(tab.page.locator("body")).to_have_attribute("data-ready", "true")
    return tab.page


def send(page: Page, text: str) -> None:
    composer = page.locator("#input")
    composer.fill(text)
    composer.press("Enter")


def user_bubbles(page: Page) -> Locator:
    return page.locator("#log > li.user")


def replies(page: Page) -> Locator:
    return page.locator("#log > li.run")


def log_texts(page: Page) -> list[tuple[str | None, str]]:
    return [
        (li.get_attribute("data-state"), li.inner_text()) for li in page.locator("#log > li").all()
    ]


def test_chat_streams_merges_reloads_and_cancels(server: WebServer, make_tab: TabFactory) -> None:
    tab = make_tab(server, viewport={"width": 1000, "height": 720})
    page = open_page(tab)
    expect(page.locator("#agent option[value=echo]")).to_have_count(1)
    expect(page.locator("#sessions")).to_contain_text("No sessions yet")

    # One message, its reply streamed: partial text first, then the whole.
    first = "hello streaming world from a real browser"
    send(page, first)
    expect(user_bubbles(page)).to_have_text([first])
    reply = replies(page).last
    streaming = page.locator("#log > li.run[data-state=streaming] .text")
    expect(streaming).to_have_text(re.compile(r"^echo: "))
    partial = streaming.inner_text()
    expect(reply).to_have_attribute("data-state", "completed", timeout=REPLY_TIMEOUT_MS)
    final = f"echo: {first}"
    expect(reply.locator(".text")).to_have_text(final)
    assert final.startswith(partial.rstrip())
    assert len(partial.strip()) < len(final)
    assert int(reply.get_attribute("data-deltas") or 0) > 1
    expect(page).to_have_url(re.compile(r"#/session/[0-9a-f-]{36}$"))
    expect(page.locator("#sessions a[aria-current=page]")).to_have_count(1)

    # Shift+Enter is a new line, not a send.
    composer = page.locator("#input")
    composer.fill("line one")
    composer.press("Shift+Enter")
    composer.press_sequentially("line two")
    expect(composer).to_have_value("line one\nline two")
    expect(user_bubbles(page)).to_have_count(1)

    # Three messages in quick succession: three bubbles at once, one merged reply.
    for text in ("one", "two", "three"):
        send(page, text)
    expect(user_bubbles(page)).to_have_text([first, "one", "two", "three"])
    expect(composer).to_have_value("")
    merged = page.locator("#log > li.run[data-state=completed][data-answers='3']")
    expect(merged).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    expect(merged.locator(".text")).to_have_text("echo: one\n---\ntwo\n---\nthree")
    expect(merged.locator(".meta")).to_have_text("answers 3 messages")
    # Superseded partial replies are gone: the first reply and the merged one remain.
    expect(replies(page)).to_have_count(2)
    expect(page.locator("#log > li.user[data-state=merged]")).to_have_count(3)
    merged.locator(".meta").hover()
    expect(page.locator("#log > li.user.highlight")).to_have_count(3)
    page.mouse.move(0, 0)
    expect(page.locator("#log > li.user.highlight")).to_have_count(0)
    screenshot(page, "chat-page")

    # A reload shows the same history, from the store.
    before = log_texts(page)
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(user_bubbles(page)).to_have_count(4)
    assert log_texts(page) == before

    # Cancel: the stop button ends the run in flight; the next message is answered.
    send(page, "a long answer that gets cancelled")
    stop = page.locator("#stop")
    expect(stop).to_be_visible()
    stop.click()
    cancelled = replies(page).last
    expect(cancelled).to_have_attribute("data-state", "cancelled")
    expect(cancelled.locator(".meta")).to_contain_text("Cancelled")
    expect(stop).to_be_hidden()
    send(page, "after the cancel")
    expect(replies(page).last.locator(".text")).to_have_text(
        "echo: after the cancel", timeout=REPLY_TIMEOUT_MS
    )

    # A failed run shows its error and a retry button, which sends the message again.
    send(page, FAILING_TOOL_CALL)
    failed = page.locator("#log > li.run[data-state=failed]")
    expect(failed).to_have_count(1, timeout=REPLY_TIMEOUT_MS)
    expect(failed.locator(".meta")).to_contain_text("tool_error")
    failed.get_by_role("button", name="Retry").click()
    expect(user_bubbles(page).last).to_have_text(FAILING_TOOL_CALL)
    expect(user_bubbles(page)).to_have_count(8)
    expect(failed).to_have_count(2, timeout=REPLY_TIMEOUT_MS)
    assert tab.errors == []


def test_reload_mid_run_follows_the_reply(server: WebServer, make_tab: TabFactory) -> None:
    page = open_page(make_tab(server))
    send(page, "still answering while the page reloads")
    expect(replies(page).last).to_have_attribute("data-state", re.compile("thinking|streaming"))
    page.reload()
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(replies(page).last.locator(".text")).to_have_text(
        "echo: still answering while the page reloads", timeout=REPLY_TIMEOUT_MS
    )
    expect(user_bubbles(page)).to_have_count(1)


def test_api_key_is_asked_for_and_kept_in_session_storage(
    start_server: ServerFactory, make_tab: TabFactory
) -> None:
    server = start_server(api_key="s3cret-key")
    tab = make_tab(server)
    page = tab.page
    page.goto("/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#key-note")).to_be_hidden()
    page.locator("#key-input").fill("wrong")
    page.locator("#key-input").press("Enter")
    expect(page.locator("#key-note")).to_be_visible()
    page.locator("#key-input").fill("s3cret-key")
    page.locator("#key-input").press("Enter")
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    expect(dialog).to_be_hidden()
    send(page, "hello with a key")
    expect(replies(page).last.locator(".text")).to_have_text(
        "echo: hello with a key", timeout=REPLY_TIMEOUT_MS
    )
    assert page.evaluate("sessionStorage.getItem('threadline.apiKey')") == "s3cret-key"
    assert "s3cret-key" not in page.evaluate("JSON.stringify(localStorage)")
    # The browser logs the 401s the key prompt answered; nothing else went wrong.
    assert [e for e in tab.errors if "401" not in e] == []


def test_phone_screen_in_dark_mode(server: WebServer, make_tab: TabFactory) -> None:
    tab = make_tab(
        server, viewport={"width": 390, "height": 780}, color_scheme="dark", is_mobile=True
    )
    page = open_page(tab)
    sidebar = page.locator("#sidebar")
    expect(sidebar).not_to_be_in_viewport()
    send(page, "hello from a phone")
    expect(replies(page).last.locator(".text")).to_have_text(
        "echo: hello from a phone", timeout=REPLY_TIMEOUT_MS
    )
    background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(20, 23, 28)"
    page.locator("#menu").click()
    expect(sidebar).to_be_in_viewport()
    expect(page.locator("#sessions a")).to_have_count(1)
    page.locator("#sessions a").click()
    expect(sidebar).not_to_be_in_viewport()
    # Nothing is wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, "chat-page-phone-dark")
    assert tab.errors == []


def test_swagger_ui_works_offline(server: WebServer, make_tab: TabFactory) -> None:
    # make_tab refuses (and reports) any request that leaves the server.
    tab = make_tab(server)
    tab.page.goto("/docs")
    expect(tab.page.locator(".swagger-ui .info .title")).to_contain_text("threadline")
    expect(tab.page.locator(".opblock-summary-path", has_text="/api/v1/agents")).to_have_count(1)


SSE_CASES = [
    # (stream text, expected [type, data, id] events)
    ("event: a\r\ndata: 1\r\nid: 5\r\n\r\n", [["a", "1", "5"]]),
    (": ping\n\ndata:x\ndata: y\n\n", [["message", "x\ny", ""]]),
    ("data\n\nevent: only\n\n", [["message", "", ""]]),
    ("id: 7\ndata: a\n\ndata: b\n\n", [["message", "a", "7"], ["message", "b", "7"]]),
    ("data: a\rdata:  b\r\rdata: unfinished", [["message", "a\n b", ""]]),
    ("id: bad\0id\ndata: z\nretry: 10\nfoo: bar\n\n", [["message", "z", ""]]),
]


def test_sse_parser_in_the_browser(server: WebServer, make_tab: TabFactory) -> None:
    """The page's SSE parser, fed whole and one character at a time (CRLF split in two)."""
    page = open_page(make_tab(server))
    script = """async (cases) => {
        const { EventParser } = await import("./web/sse.js");
        const parse = (chunks) => {
            const parser = new EventParser();
            return chunks.flatMap((c) => parser.feed(c)).map((e) => [e.type, e.data, e.id]);
        };
        return cases.map((text) => [parse([text]), parse([...text])]);
    }"""
    results = page.evaluate(script, [stream for stream, _ in SSE_CASES])
    for (stream, expected), (whole, by_char) in zip(SSE_CASES, results, strict=True):
        assert whole == expected, stream
        assert by_char == expected, stream
