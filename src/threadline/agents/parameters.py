"""What an agent's graph sends with its first model request, for the direct path.

The direct path (``LoadedAgent.direct``, ``runner.py``) sends an agent's first model request
itself, as the graph would send it. For an agent with tools that request carries the tools'
definitions as the graph resolves them (names, schemas, the toolset they belong to, whether
the model sees them). Rather than rebuild those from pydantic-ai's internals, they are read off
one graph run of the agent on a model that answers at once, in this process: no tool runs and
nothing is sent anywhere. The parameters are kept as the graph hands them to a model, before
the model prepares them for its own API (which the real model then does on every request, as
it does for the graph).

Only plain functions qualify as tools (``static_tools``): a ``Tool`` may change its definition
per run (``prepare``), per model (``include_return_schema``, native variants) or per history
(``defer_loading``), which one reading cannot capture.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic_ai import Agent, Tool
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.settings import ModelSettings

from threadline.agents.spec import RunDeps


def static_tools(tools: Iterable[Callable[..., Any]]) -> bool:
    """Whether every tool's definition is the same on every run, for every model."""
    return not any(isinstance(tool, Tool) for tool in tools)


class _Probe(Model):
    """Answers at once, keeping the parameters of each request as the graph passed them."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[ModelRequestParameters] = []

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        self.seen.append(model_request_parameters)
        return ModelResponse(parts=[TextPart("probe")])

    @property
    def model_name(self) -> str:
        return "probe"

    @property
    def system(self) -> str:
        return "probe"


async def first_request_parameters(agent: Agent[RunDeps, str]) -> ModelRequestParameters:
    """The parameters of the graph's first model request for ``agent``: its tools and the
    agent's own instructions (the runner puts a run's caller's next to those)."""
    probe = _Probe()
    await agent.run("probe", model=probe, deps=RunDeps(uuid.uuid4(), uuid.uuid4(), None))
    return probe.seen[0]
