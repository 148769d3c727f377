"""The blocking baseline: threadline's route, SQL and agent run, on a synchronous driver.

    python scripts/benchmarks/baseline_server.py --port 8002 --database-url postgresql://...

This is how a typical agent server looks before the fix: an ``async def`` handler that calls a
synchronous PostgreSQL driver (psycopg 3, from a small connection pool) directly. Every query
stops the event loop for a full database round trip, so while one request waits for
PostgreSQL no other request makes progress: not its parsing, not its model call, not its reply.
The cost grows with the round-trip time, which is why the benchmark puts the database behind a
latency proxy. Same three round trips and same ``echo`` agent run as ``ceiling_server.py``
(or, with ``--openai-model``, the same provider agent), and the same garbage-collector settings
as threadline and the ceilings (``reference.tune_gc``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import queue
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import psycopg
import uvicorn
from fastapi import FastAPI, HTTPException
from psycopg.rows import dict_row
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
    psycopg_params,
    psycopg_sql,
    split_turn,
    to_model_messages,
    tune_gc,
)

from threadline.agents.echo import ModelCallStats
from threadline.agents.spec import RunDeps
from threadline.monitor import LoopLagMonitor

_SQL = {
    q: psycopg_sql(q)
    for q in (ADD_MESSAGE_AND_START, COMMIT_RUN, CREATE_SESSION, GET_OR_CREATE_SESSION)
}
_SESSION_EXISTS = "SELECT id FROM sessions WHERE id = %(p1)s"


class BlockingPool:
    """A plain pool of psycopg connections, the way such servers usually share them."""

    def __init__(self, url: str, size: int) -> None:
        self._idle: queue.SimpleQueue[psycopg.Connection[Any]] = queue.SimpleQueue()
        self._all = [
            psycopg.connect(url, autocommit=True, row_factory=dict_row) for _ in range(size)
        ]
        for conn in self._all:
            self._idle.put(conn)

    @contextlib.contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        conn = self._idle.get()
        try:
            yield conn
        finally:
            self._idle.put(conn)

    def fetch(self, query: str, *args: Any) -> list[dict[str, Any]]:
        with self.connection() as conn:
            return conn.execute(_SQL.get(query, query), psycopg_params(args)).fetchall()

    def close(self) -> None:
        for conn in self._all:
            conn.close()


def create_app(
    database_url: str, *, delay_s: float, pool_size: int = 4, openai_model: str | None = None
) -> FastAPI:
    stats = ModelCallStats()
    monitor = LoopLagMonitor()
    agents = [build_agent(delay_s, stats)]
    pools: list[BlockingPool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            if openai_model is not None:
                agents[0] = await stack.enter_async_context(openai_agent(openai_model))
            pool = BlockingPool(database_url, pool_size)
            stack.callback(pool.close)
            with pool.connection() as conn:
                conn.execute(SCHEMA)
            pools.append(pool)
            # The same collector settings as threadline and the ceilings: the latency target
            # compares servers, not garbage-collector thresholds.
            tune_gc()
            async with monitor.running():
                yield

    app = FastAPI(lifespan=lifespan)
    install_ops_routes(app, monitor, stats)

    def session_for(pool: BlockingPool, name: str, body: RunRequest) -> uuid.UUID:
        if body.session_id is not None:
            if pool.fetch(_SESSION_EXISTS, body.session_id):
                return body.session_id
            raise HTTPException(404, "session not found")
        if body.session_name is None:
            rows: Sequence[dict[str, Any]] = pool.fetch(
                CREATE_SESSION, uuid.uuid4(), body.user_id, name
            )
            created: uuid.UUID = rows[0]["id"]
            return created
        for _ in range(5):
            rows = pool.fetch(
                GET_OR_CREATE_SESSION, uuid.uuid4(), body.session_name, body.user_id, name
            )
            if rows:
                found: uuid.UUID = rows[0]["id"]
                return found
        raise HTTPException(503, "session contention")

    @app.post("/api/v1/agent/{name}/run", response_model=RunResponse)
    async def run_agent(name: str, body: RunRequest) -> RunResponse:
        pool = pools[0]
        # The bug this server exists to show: synchronous I/O inside an async handler.
        session_id = session_for(pool, name, body)
        message_id, run_id, reply_id = new_ids()
        rows = pool.fetch(
            ADD_MESSAGE_AND_START,
            session_id,
            message_id,
            run_id,
            body.message_content,
            HISTORY_LIMIT,
        )
        message, history = split_turn(rows)
        result = await agents[0].run(
            body.message_content,
            message_history=to_model_messages(history),
            deps=RunDeps(session_id, run_id, body.user_id, body.context),
        )
        usage = {
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "requests": result.usage.requests,
            "tool_calls": result.usage.tool_calls,
        }
        pool.fetch(
            COMMIT_RUN,
            session_id,
            run_id,
            reply_id,
            result.output,
            message["seq"],
            json.dumps(usage),
        )
        return RunResponse(
            message=result.output,
            session_id=session_id,
            run_id=run_id,
            message_ids=[message_id],
            usage=usage,
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--model-delay-ms", type=float, default=50.0)
    # The loop runs one query at a time, so more connections would sit idle.
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument(
        "--openai-model",
        metavar="openai-compat:NAME@URL",
        help="run threadline's assistant agent on this model instead of the echo agent",
    )
    args = parser.parse_args()
    app = create_app(
        args.database_url,
        delay_s=args.model_delay_ms / 1000,
        pool_size=args.pool_size,
        openai_model=args.openai_model,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
