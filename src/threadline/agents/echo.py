"""``threadline:echo``: a deterministic built-in model, so the server works with no API key.

It is a pydantic-ai ``FunctionModel``, so the real agent and tool pipeline runs. Its reply
contains the user prompt verbatim (``echo: <prompt>``). A prompt line ``/call TOOL {json}``
makes it call that tool first and append ``[TOOL -> result]`` to the reply. A simulated
latency (``THREADLINE_ECHO_DELAY_MS``) is awaited per model request and is cancellable, which
is how the tests and benchmarks create runs worth cancelling.

Streamed (a caller asked ``stream``), the same reply comes in word chunks, the latency spread
evenly before them, so a watcher sees text arrive over the whole delay.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
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
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

MODEL_NAME = "threadline:echo"
# A streamed reply comes in at most this many chunks (whole words each).
STREAM_CHUNKS = 8


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


def _reply(messages: list[ModelMessage], info: AgentInfo) -> TextPart | ToolCallPart:
    prompt = last_prompt(messages)
    returns = [p for p in messages[-1].parts if isinstance(p, ToolReturnPart)]
    if returns:
        notes = "".join(f"\n[{r.tool_name} -> {r.model_response_str()}]" for r in returns)
        return TextPart(f"echo: {prompt}{notes}")
    return _tool_call(prompt, info) or TextPart(f"echo: {prompt}")


def chunks(text: str, at_most: int = STREAM_CHUNKS) -> list[str]:
    """``text`` cut between words into at most ``at_most`` pieces that join back to it."""
    words = re.findall(r"\s*\S+\s*", text) or [text]
    size = -(-len(words) // at_most)
    return ["".join(words[i : i + size]) for i in range(0, len(words), size)]


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
        stats.completed += 1
        return ModelResponse(parts=[_reply(messages, info)])

    async def stream(
        messages: list[ModelMessage], info: AgentInfo
    ) -> AsyncIterator[str | DeltaToolCalls]:
        stats.started += 1
        reply = _reply(messages, info)
        pieces = chunks(reply.content) if isinstance(reply, TextPart) else [""]
        try:
            for piece in pieces:
                if delay_s > 0:
                    await asyncio.sleep(delay_s / len(pieces))
                if isinstance(reply, ToolCallPart):
                    yield {0: DeltaToolCall(reply.tool_name, reply.args_as_json_str())}
                else:
                    yield piece
        except asyncio.CancelledError:
            stats.cancelled += 1
            raise
        stats.completed += 1

    return FunctionModel(respond, stream_function=stream, model_name=MODEL_NAME)
