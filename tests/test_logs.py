"""Log lines: the request id rule, both formats, and what ``configure`` does to the loggers."""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from threadline import logs
from threadline.config import Settings


def record(message: str = "hello", exc: BaseException | None = None) -> logging.LogRecord:
    info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    made = logging.LogRecord("threadline.test", logging.INFO, __file__, 1, message, (), info)
    logs._ContextFilter().filter(made)
    return made


def raised() -> BaseException:
    try:
        raise ValueError("boom")
    except ValueError as exc:
        return exc


@pytest.mark.parametrize("given", ["abc-123", "x" * 128, "req id with spaces ~!"])
def test_a_printable_request_id_up_to_128_characters_is_kept(given: str) -> None:
    assert logs.request_id(given) == given


@pytest.mark.parametrize("given", [None, "", "x" * 129, "new\nline", "tab\there", "é"])
def test_any_other_request_id_is_replaced_by_a_new_one(given: str | None) -> None:
    made = logs.request_id(given)
    assert made != given
    assert len(made) == 32
    assert made.isalnum()
    assert logs.request_id(given) != made  # a fresh one each time


async def test_the_ids_of_the_current_context_go_on_every_line() -> None:
    session = uuid.uuid4()
    logs.scope(request_id="r-1")
    logs.bind(session_id=session)
    line = logs.TextFormatter().format(record())
    assert line.endswith(f"INFO threadline.test: hello [request_id=r-1 session_id={session}]")

    body = json.loads(logs.json_formatter().format(record()))
    assert body["message"] == "hello"
    assert body["level"] == "INFO"
    assert body["logger"] == "threadline.test"
    assert body["request_id"] == "r-1"
    assert body["session_id"] == str(session)
    assert body["run_id"] is None
    assert isinstance(body["pid"], int)
    assert "time" in body


async def test_a_line_outside_any_context_has_no_ids() -> None:
    assert logs.current() is None  # each test runs in a context of its own
    assert logs.TextFormatter().format(record()).endswith("threadline.test: hello")


def test_an_exception_is_logged_with_its_traceback_in_both_formats() -> None:
    exc = raised()
    text = logs.TextFormatter().format(record("failed", exc))
    assert text.splitlines()[0].endswith("failed")
    assert "Traceback (most recent call last)" in text
    assert "ValueError: boom" in text
    body = json.loads(logs.json_formatter().format(record("failed", exc)))
    assert "Traceback (most recent call last)" in body["exc_info"]
    assert "ValueError: boom" in body["exc_info"]


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    names = (*logs.QUIET_LOGGERS, "uvicorn.error")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in levels.items():
        logging.getLogger(name).setLevel(old)


def test_configure_sends_json_lines_to_stderr_and_quiets_the_sdk_loggers(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = Settings(_env_file=None, log_format="json", log_level="debug")
    logs.configure(settings)
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    assert [type(h) for h in root.handlers] == [logging.StreamHandler]
    assert logging.getLogger("httpx").level == logging.WARNING
    assert logging.getLogger("openai").level == logging.WARNING
    logging.getLogger("httpx").info("HTTP Request: POST https://api.example/v1 200")
    logging.getLogger("uvicorn.error").info("Started server process")
    handler = root.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    assert handler.stream is sys.stderr
    lines = capsys.readouterr().err.splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["Started server process"]


def test_log_settings_take_any_case_and_refuse_unknown_values() -> None:
    settings = Settings(_env_file=None, log_format="JSON", log_level="warning")
    assert (settings.log_format, settings.log_level) == ("json", "WARNING")
    with pytest.raises(ValidationError, match="log_format"):
        Settings(_env_file=None, log_format="xml")


def test_uvicorn_writes_no_access_line_beside_ours(restore_logging: None) -> None:
    # uvicorn logs an access line when its logger has handlers, wherever they are (its
    # protocols check ``hasHandlers()``): our per-request line replaces it, so there must be
    # none, or every request is logged twice.
    access = logging.getLogger("uvicorn.access")
    propagate = access.propagate
    try:
        logs.configure(Settings(_env_file=None))
        assert not access.hasHandlers()
        assert logging.getLogger("uvicorn.error").hasHandlers()
    finally:
        access.propagate = propagate
