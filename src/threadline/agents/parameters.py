"""What an agent's graph sends with its first model request, for the direct path.

The direct path (``LoadedAgent.direct``, ``runner.py``) sends an agent's first model request
itself, as the graph would send it. For an agent with tools that request carries the tools'
definitions as the graph resolves them (names, schemas, the toolset they belong to, whether
the model sees them). Rather than rebuild those from pydantic-ai's internals, they are read off
one graph run of the agent on a model that answers at once, in this process: no tool runs and
nothing is sent anywhere. Only tools whose definitions cannot change per run qualify (plain
functions, or ``Tool``s without ``prepare``): ``static_tools``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from typing import Any

from pydantic_ai import Agent, Tool
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.function import AgentInfo, FunctionModel

from threadline.agents.spec import RunDeps


def static_tools(tools: Iterable[Callable[..., Any]]) -> bool:
    """Whether every tool's definition is the same on every run."""
    return all(not isinstance(tool, Tool) or tool.prepare is None for tool in tools)


async def first_request_parameters(agent: Agent[RunDeps, str]) -> ModelRequestParameters:
    """The parameters of the graph's first model request for ``agent``, without a caller's
    instructions (the runner adds those per run)."""
    seen: list[ModelRequestParameters] = []

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(info.model_request_parameters)
        return ModelResponse(parts=[TextPart("probe")])

    deps = RunDeps(uuid.uuid4(), uuid.uuid4(), None)
    await agent.run("probe", model=FunctionModel(answer), deps=deps)
    return seen[0]
