"""Tell a tool's exception apart from every other failure of an agent run.

pydantic-ai lets an exception raised inside a tool propagate out of the run as it is (a
``KeyError`` from a tool looks like a ``KeyError`` from anywhere). This capability catches it
at the tool boundary and raises ``ToolError`` naming the tool, so the runner can answer with
the stable ``tool_error`` code and a message safe to show a user, and log the original with
the run's ids.
"""

from __future__ import annotations

from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import ToolDefinition

from threadline.agents.spec import RunDeps
from threadline.errors import ToolError


class ToolErrorCapture(AbstractCapability[RunDeps]):
    async def on_tool_execute_error(
        self,
        ctx: RunContext[RunDeps],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: Any,
        error: Exception,
    ) -> Any:
        raise ToolError(
            f"the agent's tool {call.tool_name!r} failed; the request was not completed",
            ctx.deps.run_id,
            tool=call.tool_name,
        ) from error


TOOL_ERRORS = ToolErrorCapture()
