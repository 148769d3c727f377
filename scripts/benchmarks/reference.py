"""What the reference servers share: the schema, the per-turn SQL, the agents and the wire shapes.

The SQL mirrors threadline's hot path for a message to a new named session, three round trips:

1. get or create the session by name;
2. insert the user message, open a run and read the history window (one statement);
3. insert the reply and finish the run (one statement).

Statements are written for asyncpg (``$1``); ``psycopg_sql`` rewrites them for psycopg. The
agent is the one threadline builds for ``echo``: the same tools, the same ``FunctionModel``, so
the reference servers pay exactly the agent framework's cost that threadline pays. With
``--openai-model`` (the ``openai`` scenario) they run threadline's ``assistant`` agent on that
model instead, built by threadline's own registry (``openai_agent``), so they pay exactly the
provider client's cost that threadline pays too.
"""

from __future__ import annotations

import contextlib
import gc
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any
from uuid import UUID

from fastapi import FastAPI
from pydantic import BaseModel, Field
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ModelResponse, TextPart, UserPromptPart

from threadline.agents.builtin import ASSISTANT, ECHO
from threadline.agents.echo import ModelCallStats, echo_model
from threadline.agents.registry import AgentRegistry
from threadline.agents.spec import RunDeps
from threadline.monitor import LoopLagMonitor

SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id uuid PRIMARY KEY,
    name text,
    agent text NOT NULL,
    user_id text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    last_seq bigint NOT NULL DEFAULT 0,
    answered_seq bigint NOT NULL DEFAULT 0,
    current_run_id uuid
);
CREATE UNIQUE INDEX IF NOT EXISTS sessions_user_name ON sessions (COALESCE(user_id, ''), name)
    WHERE name IS NOT NULL;
CREATE TABLE IF NOT EXISTS messages (
    id uuid PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    run_id uuid,
    created_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (session_id, seq)
);
CREATE TABLE IF NOT EXISTS runs (
    id uuid PRIMARY KEY,
    session_id uuid NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    status text NOT NULL,
    message_ids uuid[] NOT NULL,
    upto_seq bigint NOT NULL,
    reply_message_id uuid,
    usage jsonb,
    started_at timestamptz,
    finished_at timestamptz
);
CREATE INDEX IF NOT EXISTS runs_session_id ON runs (session_id);
"""

# $1 id, $2 name, $3 user_id, $4 agent. The insert's row is invisible to the second branch's
# snapshot, so exactly one branch answers (none if a racing insert committed after our
# snapshot: the caller reruns).
GET_OR_CREATE_SESSION = """
WITH ins AS (
    INSERT INTO sessions (id, name, user_id, agent)
    VALUES ($1::uuid, $2::text, $3::text, $4::text)
    ON CONFLICT DO NOTHING
    RETURNING id
)
SELECT id FROM ins
UNION ALL
SELECT id FROM sessions WHERE COALESCE(user_id, '') = COALESCE($3::text, '') AND name = $2::text
"""
CREATE_SESSION = """
INSERT INTO sessions (id, user_id, agent) VALUES ($1::uuid, $2::text, $3::text) RETURNING id
"""

# $1 session, $2 message id, $3 run id, $4 content, $5 history_limit. Rows: the history
# window (older rows, the snapshot cannot see the new one) then the new message.
ADD_MESSAGE_AND_START = """
WITH s AS (
    UPDATE sessions SET last_seq = last_seq + 1, updated_at = now(), current_run_id = $3::uuid
    WHERE id = $1::uuid
    RETURNING last_seq
),
m AS (
    INSERT INTO messages (id, session_id, seq, role, content)
    SELECT $2::uuid, $1::uuid, s.last_seq, 'user', $4::text FROM s
    RETURNING id, seq, role, content
),
r AS (
    INSERT INTO runs (id, session_id, status, message_ids, upto_seq, started_at)
    SELECT $3::uuid, $1::uuid, 'running', ARRAY[m.id], m.seq, now() FROM m
    RETURNING id
),
history AS (
    SELECT id, seq, role, content FROM messages
    WHERE session_id = $1::uuid ORDER BY seq DESC LIMIT $5::bigint
)
SELECT 'message' AS kind, m.* FROM m
UNION ALL SELECT 'history', history.* FROM history
ORDER BY seq
"""

# $1 session, $2 run, $3 reply id, $4 reply text, $5 upto_seq, $6 usage (JSON text). The
# session UPDATE is the fence, as in threadline: only the current run may commit.
COMMIT_RUN = """
WITH s AS (
    UPDATE sessions
    SET last_seq = last_seq + 1, updated_at = now(), current_run_id = NULL,
        answered_seq = GREATEST(answered_seq, $5::bigint)
    WHERE id = $1::uuid AND current_run_id = $2::uuid
    RETURNING last_seq
),
m AS (
    INSERT INTO messages (id, session_id, seq, role, content, run_id)
    SELECT $3::uuid, $1::uuid, s.last_seq, 'assistant', $4::text, $2::uuid FROM s
    RETURNING id
),
r AS (
    UPDATE runs SET status = 'succeeded', reply_message_id = m.id, usage = $6::text::jsonb,
        finished_at = now()
    FROM m WHERE runs.id = $2::uuid
)
SELECT id FROM m
"""

HISTORY_LIMIT = 20


def psycopg_sql(query: str) -> str:
    """``$1`` placeholders (asyncpg) as ``%(p1)s`` (psycopg), so one text serves both drivers."""
    return re.sub(r"\$(\d+)", r"%(p\1)s", query)


def psycopg_params(args: Sequence[Any]) -> dict[str, Any]:
    return {f"p{i}": value for i, value in enumerate(args, start=1)}


class RunRequest(BaseModel):
    message_content: str = Field(min_length=1)
    session_id: UUID | None = None
    session_name: str | None = Field(default=None, min_length=1, max_length=200)
    user_id: str | None = Field(default=None, max_length=200)
    context: dict[str, Any] = Field(default_factory=dict)


class RunResponse(BaseModel):
    message: str
    session_id: UUID
    run_id: UUID
    message_ids: list[UUID]
    success: bool = True
    superseded: bool = False
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    tool_outputs: list[dict[str, Any]] = Field(default_factory=list)
    usage: dict[str, Any] = Field(default_factory=dict)


def build_agent(delay_s: float, stats: ModelCallStats) -> Agent[RunDeps, str]:
    """The agent threadline's registry builds for the built-in ``echo`` spec."""
    return Agent(
        echo_model(delay_s, stats),
        instructions=ECHO.instructions or None,
        deps_type=RunDeps,
        output_type=str,
        tools=ECHO.tools,
        model_settings=ECHO.model_settings,
        name=ECHO.name,
    )


@contextlib.asynccontextmanager
async def openai_agent(model: str) -> AsyncIterator[Agent[RunDeps, str]]:
    """The agent threadline serves as ``assistant`` with ``THREADLINE_MODEL=model``
    (``openai-compat:NAME@URL``), built by threadline's own registry: the same OpenAI
    provider, client and client settings, whatever they are at this commit. The registry owns
    the client and closes it."""
    registry = AgentRegistry([ASSISTANT], default_model=model)
    await registry.start()
    try:
        loaded = await registry.get(ASSISTANT.name)
        yield loaded.agent
    finally:
        await registry.aclose()


def to_model_messages(rows: Sequence[Any]) -> list[ModelMessage]:
    """History rows (role, content) as pydantic-ai messages, as threadline's runner does."""
    return [
        ModelRequest(parts=[UserPromptPart(row["content"])])
        if row["role"] == "user"
        else ModelResponse(parts=[TextPart(row["content"])])
        for row in rows
    ]


def split_turn(rows: Sequence[Any]) -> tuple[Any, list[Any]]:
    """The new message row and the history rows of ``ADD_MESSAGE_AND_START``."""
    message = next(row for row in rows if row["kind"] == "message")
    return message, [row for row in rows if row["kind"] == "history"]


def new_ids() -> tuple[UUID, UUID, UUID]:
    """Ids for the user message, the run and the reply."""
    return uuid.uuid4(), uuid.uuid4(), uuid.uuid4()


def tune_gc() -> None:
    """The garbage-collector tweak threadline's lifespan applies (``THREADLINE_GC_TUNING``,
    ``threadline.app.tune_gc``), done once the app is up: the long-lived start-up objects are
    frozen out of the collector's way and young collections run every 20,000 allocations
    instead of 700. The ceilings do the same so that the 70 %-of-ceiling comparison measures
    threadline's work, not a collector setting, and so does the blocking baseline, which the
    latency target compares with threadline."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)


def install_ops_routes(app: FastAPI, monitor: LoopLagMonitor, stats: ModelCallStats) -> None:
    """``/health``, ``/debug/metrics`` and its reset, with the fields threadline exposes."""

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    def snapshot() -> dict[str, Any]:
        return {
            "loop_lag": monitor.snapshot(),
            "model_calls": {
                "started": stats.started,
                "completed": stats.completed,
                "cancelled": stats.cancelled,
            },
        }

    @app.get("/debug/metrics")
    async def metrics() -> dict[str, Any]:
        return snapshot()

    @app.post("/debug/metrics/reset")
    async def reset_metrics() -> dict[str, Any]:
        body = snapshot()
        monitor.reset()
        return body
