"""The agents every threadline server has: ``echo`` and ``assistant``."""

from __future__ import annotations

import datetime as dt

from pydantic_ai import RunContext

from threadline.agents.spec import AgentSpec, RunDeps


def current_time(timezone_offset_hours: float = 0.0) -> str:
    """The current date and time, ISO 8601, at the given UTC offset in hours."""
    tz = dt.timezone(dt.timedelta(hours=timezone_offset_hours))
    return dt.datetime.now(tz).isoformat(timespec="seconds")


def conversation_context(ctx: RunContext[RunDeps], key: str) -> str:
    """Look up a value the caller passed in the request's ``context`` object."""
    value = ctx.deps.context.get(key)
    return "" if value is None else str(value)


ECHO = AgentSpec(
    name="echo",
    description="Repeats what it is told; uses the built-in deterministic model.",
    model="threadline:echo",
    tools=(current_time, conversation_context),
)

ASSISTANT = AgentSpec(
    name="assistant",
    description="General chat assistant with a clock and access to the request context.",
    instructions=(
        "You are a helpful assistant in a chat. The user may send several messages in a row; "
        "when they are separated by '---', answer them together as one request."
    ),
    tools=(current_time, conversation_context),
)

BUILTIN_AGENTS: tuple[AgentSpec, ...] = (ECHO, ASSISTANT)
