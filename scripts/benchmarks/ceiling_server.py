"""The ceilings: a bare FastAPI + asyncpg endpoint doing threadline's turn with nothing around it.

    python scripts/benchmarks/ceiling_server.py --port 8001 --database-url postgresql://...
    python scripts/benchmarks/ceiling_server.py --no-framework ...

Same route, same three database round trips, same ``echo`` agent run with the same simulated
model, but no queue, no per-session ordering, no cancel-and-merge and no bookkeeping. It is
what this machine can do with the same agent framework, so threadline's throughput is judged
against it. ``--no-framework`` calls the echo model's function directly instead of running the
agent: the difference between the two ceilings is what pydantic-ai's ``Agent.run`` costs.
``--openai-model openai-compat:NAME@URL`` runs threadline's ``assistant`` agent on that model,
built by threadline's registry (``reference.openai_agent``): the same provider client.

Both expose /health and /debug/metrics (event-loop lag, model calls) like threadline, and
both tune the garbage collector after start-up as threadline does (``reference.tune_gc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import uvicorn
from fastapi import FastAPI, HTTPException
from pydantic_ai.messages import ModelRequest, TextPart, UserPromptPart
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.function import AgentInfo
from reference import (
    ADD_MESSAGE_AND_START,
    COMMIT_RUN,
    CREATE_SESSION,
    GET_OR_CREATE_SESSION,
    HISTORY_LIMIT,
    SCHEMA,
    RunRequest,
    RunResponse,
    build_agent,
    install_ops_routes,
    new_ids,
    openai_agent,
    split_turn,
    to_model_messages,
    tune_gc,
)

from threadline.agents.echo import ModelCallStats, echo_model
from threadline.agents.spec import RunDeps
from threadline.monitor import LoopLagMonitor

# What the echo function reads from AgentInfo: no tools, text output allowed.
_BARE_INFO = AgentInfo(
    function_tools=[],
    allow_text_output=True,
    output_tools=[],
    model_settings=None,
    model_request_parameters=ModelRequestParameters(),
    instructions=None,
)


async def _keep_session(conn: Any) -> None:
    """No reset on release, as threadline's store does: asyncpg's default reset costs one more
    round trip per query, and these connections keep no session state."""


def create_app(
    database_url: str,
    *,
    delay_s: float,
    framework: bool,
    pool_max_size: int = 20,
    openai_model: str | None = None,
) -> FastAPI:
    stats = ModelCallStats()
    monitor = LoopLagMonitor()
    agents = [build_agent(delay_s, stats)]
    model = echo_model(delay_s, stats)
    pools: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if openai_model is not None:
                agents[0] = await stack.enter_async_context(openai_agent(openai_model))
            pool = await asyncpg.create_pool(
                database_url, min_size=2, max_size=pool_max_size, reset=_keep_session
            )
            stack.push_async_callback(pool.close)
            await pool.execute(SCHEMA)
            pools.append(pool)
            tune_gc()  # as threadline's lifespan does by default (THREADLINE_GC_TUNING)
            async with monitor.running():
                yield

    app = FastAPI(lifespan=lifespan)
    install_ops_routes(app, monitor, stats)

    async def session_for(pool: Any, name: str, body: RunRequest) -> uuid.UUID:
        if body.session_id is not None:
            if await pool.fetchval("SELECT id FROM sessions WHERE id = $1", body.session_id):
                return body.session_id
            raise HTTPException(404, "session not found")
        if body.session_name is None:
            session_id: uuid.UUID = await pool.fetchval(
                CREATE_SESSION, uuid.uuid4(), body.user_id, name
            )
            return session_id
        for _ in range(5):
            rows = await pool.fetch(
                GET_OR_CREATE_SESSION, uuid.uuid4(), body.session_name, body.user_id, name
            )
            if rows:
                found: uuid.UUID = rows[0]["id"]
                return found
        raise HTTPException(503, "session contention")

    @app.post("/api/v1/agent/{name}/run", response_model=RunResponse)
    async def run_agent(name: str, body: RunRequest) -> RunResponse:
        pool = pools[0]
        session_id = await session_for(pool, name, body)
        message_id, run_id, reply_id = new_ids()
        rows = await pool.fetch(
            ADD_MESSAGE_AND_START,
            session_id,
            message_id,
            run_id,
            body.message_content,
            HISTORY_LIMIT,
        )
        message, history = split_turn(rows)
        if framework:
            result = await agents[0].run(
                body.message_content,
                message_history=to_model_messages(history),
                deps=RunDeps(session_id, run_id, body.user_id, body.context),
            )
            text = result.output
            usage: dict[str, Any] = {
                "input_tokens": result.usage.input_tokens,
                "output_tokens": result.usage.output_tokens,
                "requests": result.usage.requests,
                "tool_calls": result.usage.tool_calls,
            }
        else:
            prompt = ModelRequest(parts=[UserPromptPart(body.message_content)])
            assert model.function is not None
            response = await model.function([*to_model_messages(history), prompt], _BARE_INFO)
            text = "".join(p.content for p in response.parts if isinstance(p, TextPart))
            usage = {"requests": 1}
        await pool.fetch(
            COMMIT_RUN, session_id, run_id, reply_id, text, message["seq"], json.dumps(usage)
        )
        return RunResponse(
            message=text,
            session_id=session_id,
            run_id=run_id,
            message_ids=[message_id],
            usage=usage,
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--model-delay-ms", type=float, default=50.0)
    parser.add_argument("--pool-max-size", type=int, default=20)
    parser.add_argument(
        "--no-framework",
        action="store_true",
        help="call the echo model's function directly instead of running the pydantic-ai agent",
    )
    parser.add_argument(
        "--openai-model",
        metavar="openai-compat:NAME@URL",
        help="run threadline's assistant agent on this model instead of the echo agent",
    )
    args = parser.parse_args()
    if args.openai_model and args.no_framework:
        parser.error("--openai-model runs the agent: it excludes --no-framework")
    app = create_app(
        args.database_url,
        delay_s=args.model_delay_ms / 1000,
        framework=not args.no_framework,
        pool_max_size=args.pool_max_size,
        openai_model=args.openai_model,
    )
    # Same server settings as `threadline serve`: uvloop and httptools when installed.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
