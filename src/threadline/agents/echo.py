"""``threadline:echo``: a deterministic built-in model, so the server works with no API key.

It is a pydantic-ai ``FunctionModel``, so the real agent and tool pipeline runs. Its reply
contains the user prompt verbatim (``echo: <prompt>``). A prompt line ``/call TOOL {json}``
makes it call that tool first and append ``[TOOL -> result]`` to the reply. A simulated
latency (``THREADLINE_ECHO_DELAY_MS``) is awaited per model request and is cancellable, which
is how the tests and benchmarks create runs worth cancelling.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

MODEL_NAME = "threadline:echo"


@dataclass(slots=True)
class ModelCallStats:
    """Counts model requests; the tests and the benchmark read it at /debug/metrics."""

    started: int = 0
    completed: int = 0
    cancelled: int = 0


def last_prompt(messages: list[ModelMessage]) -> str:
    """The text of the newest user prompt the model was given."""
    for message in reversed(messages):
        if isinstance(message, ModelRequest):
            for part in reversed(message.parts):
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return part.content
    return ""


def _tool_call(prompt: str, info: AgentInfo) -> ToolCallPart | None:
    known = {tool.name for tool in info.function_tools}
    for line in prompt.splitlines():
        if line.startswith("/call "):
            name, _, raw_args = line[len("/call ") :].strip().partition(" ")
            if name in known:
                args = json.loads(raw_args) if raw_args.strip() else {}
                return ToolCallPart(name, args)
    return None


def echo_model(delay_s: float = 0.0, stats: ModelCallStats | None = None) -> FunctionModel:
    stats = stats if stats is not None else ModelCallStats()

    async def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        stats.started += 1
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        prompt = last_prompt(messages)
        last = messages[-1]
        returns = [p for p in last.parts if isinstance(p, ToolReturnPart)]
        stats.completed += 1
        if returns:
            notes = "".join(f"\n[{r.tool_name} -> {r.model_response_str()}]" for r in returns)
            return ModelResponse(parts=[TextPart(f"echo: {prompt}{notes}")])
        call = _tool_call(prompt, info)
        if call is not None:
            return ModelResponse(parts=[call])
        return ModelResponse(parts=[TextPart(f"echo: {prompt}")])

    return FunctionModel(respond, model_name=MODEL_NAME)
