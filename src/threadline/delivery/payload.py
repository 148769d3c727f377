"""The deliveries a finished run owes: one per distinct webhook URL among its messages.

Each message carries its caller's ``webhook_url`` in its stored run options; a message without
one uses its agent's ``AgentSpec.webhook_url``. A merged run answering three messages is one
delivery per URL, each listing all three: the reply answers them together.

The body is built here, before the statement that ends the run, from what that statement
stores (run, messages, reply or error), and stored as the exact text that is signed and sent.
"""

from __future__ import annotations

import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Literal
from uuid import UUID

from threadline.queue.job import RunOptions, TurnResult
from threadline.store import Message, NewDelivery, RunError

Event = Literal["run.succeeded", "run.failed", "run.cancelled"]


def webhook_urls(
    prompt: Sequence[Message], fallback: RunOptions | None, default: str | None
) -> list[str]:
    """The distinct URLs (in message order) the run's messages asked to be told at.

    ``prompt`` empty (a run whose messages are not at hand): the run's own options decide.
    """
    wanted: Iterable[Mapping[str, Any]] = [m.options or {} for m in prompt]
    if not prompt:
        wanted = [fallback.to_json() if fallback is not None else {}]
    urls: dict[str, None] = {}
    for options in wanted:
        url = options.get("webhook_url") or default
        if url:
            urls[url] = None
    return list(urls)


def webhook_deliveries(
    urls: Sequence[str],
    event: Event,
    *,
    session_id: UUID,
    run_id: UUID,
    agent: str,
    message_ids: Sequence[UUID],
    result: TurnResult | None = None,
    error: RunError | None = None,
) -> list[NewDelivery]:
    created_at = dt.datetime.now(dt.UTC).isoformat()
    reply = None
    if result is not None:
        reply = asdict(result)
        reply["reply_message_id"] = str(result.reply_message_id)
    deliveries = []
    for url in urls:
        delivery_id = uuid.uuid4()
        body = {
            "id": str(delivery_id),
            "event": event,
            "created_at": created_at,
            "session_id": str(session_id),
            "run_id": str(run_id),
            "agent": agent,
            "message_ids": [str(m) for m in message_ids],
            "reply": reply,
            "error": None if error is None else {"code": error.code, "message": error.message},
        }
        deliveries.append(NewDelivery(delivery_id, url, json.dumps(body, separators=(",", ":"))))
    return deliveries
