"""What a run tells the people watching it, as it goes: the events behind the SSE streams.

The runner emits them through an ``EventSink``; the coordinator's event bus
(``coordination/events.py``) numbers them per session, keeps a short log for joiners that
arrive late or resume (``Last-Event-ID``) and hands them to every watcher, in this process or
(through Redis) in any other. Each event names its run; a watcher of a *message* follows the
runs that cover it (``run.started`` lists their messages) until one of them closes it.

    run.started     {run_id, session_id, message_ids}
    text.delta      {run_id, delta}                       the provider's streamed text
    tool.call       {run_id, tool_name, args, tool_call_id}
    tool.result     {run_id, tool_name, content, tool_call_id}
    run.superseded  {run_id, superseded_by}               merged into a newer run
    run.completed   {run_id, session_id, message_ids, message, reply_message_id,
                     tool_calls, tool_outputs, usage}
    run.failed      {run_id, session_id, message_ids, error: {code, message}}

A ``run.failed`` with no ``message_ids`` closed nothing (a shutdown): its messages go to the
session's next run, as after ``run.superseded``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol
from uuid import UUID

Kind = Literal[
    "run.started",
    "text.delta",
    "tool.call",
    "tool.result",
    "run.superseded",
    "run.completed",
    "run.failed",
]
TERMINAL: frozenset[str] = frozenset({"run.superseded", "run.completed", "run.failed"})


@dataclass(frozen=True, slots=True)
class RunEvent:
    kind: Kind
    session_id: UUID
    run_id: UUID
    data: dict[str, Any] = field(default_factory=dict)
    # Assigned by the bus: ordered within a session; opaque to clients (SSE ``id``).
    id: str = ""

    @property
    def terminal(self) -> bool:
        return self.kind in TERMINAL

    def closes(self, message_id: UUID) -> bool:
        """Whether this event ends the run that answers ``message_id``: its reply, or its
        failure or cancel (which answer the message too)."""
        return self.kind in ("run.completed", "run.failed") and str(message_id) in self.data.get(
            "message_ids", ()
        )

    def covers(self, message_id: UUID) -> bool:
        return self.kind == "run.started" and str(message_id) in self.data.get("message_ids", ())

    def to_json(self) -> str:
        return json.dumps(
            {"k": self.kind, "s": str(self.session_id), "r": str(self.run_id), "d": self.data}
        )

    @classmethod
    def from_json(cls, raw: str | bytes, id: str) -> RunEvent:
        body = json.loads(raw)
        return cls(body["k"], UUID(body["s"]), UUID(body["r"]), body["d"], id)


def event_key(event_id: str) -> tuple[int, ...]:
    """Order of bus ids ("12" in one process, Redis stream ids "1700000000000-3" across
    processes); anything unparsable sorts first, so a bad ``Last-Event-ID`` replays all."""
    try:
        return tuple(int(part) for part in event_id.split("-"))
    except ValueError:
        return (-1,)


class EventSink(Protocol):
    def emit(self, event: RunEvent) -> None:
        """Hand an event on without waiting and without raising: watching a run is best
        effort, answering it is not."""


class NoEvents:
    def emit(self, event: RunEvent) -> None:
        pass
