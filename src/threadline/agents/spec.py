"""What a user writes to define an agent, and what each run's tools receive.

An ``AgentSpec`` is frozen: it is built once (at import of the agents module) and shared by
every request. Everything that differs per request lives in ``RunDeps``, which is built fresh
for each run and reaches tools as ``ctx.deps``.

A user agents module (``THREADLINE_AGENTS_MODULE=myapp.agents``) exposes ``AGENTS``, a list of
specs::

    from pydantic_ai import RunContext
    from threadline.agents import AgentSpec, RunDeps

    def order_status(ctx: RunContext[RunDeps], order_id: str) -> str:
        return lookup(ctx.deps.user_id, order_id)

    AGENTS = [AgentSpec(name="support", instructions="You help with orders.",
                        model="openai:gpt-4o-mini", tools=(order_status,))]
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from pydantic_ai.models import Model
from pydantic_ai.settings import ModelSettings


@dataclass(frozen=True, slots=True)
class RunDeps:
    """Per-run dependencies handed to tools; never shared between requests."""

    session_id: UUID
    run_id: UUID
    user_id: str | None
    context: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AgentSpec:
    name: str
    description: str = ""
    instructions: str = ""
    # A pydantic-ai model string ("openai:gpt-4o", "anthropic:claude-...", "threadline:echo",
    # "openai-compat:llama3@http://127.0.0.1:11434/v1"), a Model, or None for THREADLINE_MODEL.
    model: str | Model | None = None
    # Plain functions or functions taking RunContext[RunDeps] first, as pydantic-ai accepts.
    tools: tuple[Callable[..., Any], ...] = ()
    model_settings: ModelSettings | None = None
    # Expensive initialisation (load an index, warm a client). Runs once per process at
    # start-up, before the server is ready; raising stops start-up.
    setup: Callable[[], Awaitable[None]] | None = None
    # Where every reply of this agent is POSTed (signed; see the README's webhooks section)
    # unless the request names its own webhook_url. Needs THREADLINE_WEBHOOK_SECRET.
    webhook_url: str | None = None
