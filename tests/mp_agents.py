"""Agents for the multi-process tests: ``THREADLINE_AGENTS_MODULE=tests.mp_agents``.

The server processes import this module; a test steers their runs only through what it sends.

* ``burst`` answers (``echo: <prompt>``) only when its prompt holds every part of a burst:
  messages containing ``part I/N of TAG`` for every I in 1..N. Any other call waits until it is
  cancelled, which is what a superseded run looks like. "One completed model call per burst"
  therefore does not depend on timing.
* ``gated`` connects, on each model call, to the test's gate at ``127.0.0.1:PORT`` (a prompt
  line ``gate PORT``), sends its prompt as one JSON line and answers only once the test sends a
  line back. The test thereby sees, in another process, that a model call started, and decides
  when it ends; a cancelled call closes its connection, so the test sees that too.
* ``streamed`` is ``gated`` that streams when a caller asked ``stream``: the first half of its
  reply (``echo: <prompt>`` in word chunks) comes before the gate, the rest once the test opens
  it, so a test sees deltas arrive mid-run and decides when the run ends. A prompt line
  ``/call note`` makes its first model call the ``note`` tool (no gate), the next one gated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator

from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from threadline.agents import AgentSpec
from threadline.agents.echo import chunks, last_prompt

PART = re.compile(r"part (\d+)/(\d+) of (\S+)")
GATE = re.compile(r"^gate (\d+)$", re.MULTILINE)


def burst_complete(prompt: str) -> bool:
    """Whether ``prompt`` holds parts 1..N of every burst it mentions (and mentions one)."""
    parts: dict[str, set[int]] = {}
    sizes: dict[str, int] = {}
    for index, size, tag in PART.findall(prompt):
        parts.setdefault(tag, set()).add(int(index))
        sizes[tag] = int(size)
    return bool(parts) and all(parts[tag] == set(range(1, sizes[tag] + 1)) for tag in parts)


async def burst(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = last_prompt(messages)
    if not burst_complete(prompt):
        await asyncio.Event().wait()  # until the run is superseded (or the server stops)
    return ModelResponse(parts=[TextPart(f"echo: {prompt}")])


@contextlib.asynccontextmanager
async def _gate(prompt: str) -> AsyncIterator[asyncio.StreamReader]:
    """Tell the test's gate that a model call started; the reader gets its "go"."""
    found = GATE.search(prompt)
    if found is None:
        raise ValueError(f"no 'gate PORT' line in {prompt!r}")
    reader, writer = await asyncio.open_connection("127.0.0.1", int(found.group(1)))
    try:
        writer.write(json.dumps({"prompt": prompt}).encode() + b"\n")
        await writer.drain()
        yield reader
    finally:
        writer.close()


async def _wait_for_go(reader: asyncio.StreamReader) -> None:
    if not await reader.readline():
        await asyncio.Event().wait()  # the test went away without opening the gate


async def gated(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = last_prompt(messages)
    async with _gate(prompt) as reader:
        await _wait_for_go(reader)
    return ModelResponse(parts=[TextPart(f"echo: {prompt}")])


def note(text: str) -> str:
    """Write a note down."""
    return f"noted {text}"


def _streamed_reply(messages: list[ModelMessage]) -> str | ToolCallPart:
    """``echo: <prompt>`` with what the tools returned; or the ``note`` call a prompt asks
    for, when the model has not called it yet."""
    prompt = last_prompt(messages)
    # Returns after the newest prompt: those of an earlier run's tool calls (history) may share
    # the last request with it.
    returns: list[ToolReturnPart] = []
    for part in reversed(messages[-1].parts):
        if not isinstance(part, ToolReturnPart):
            break
        returns.insert(0, part)
    if returns:
        return f"echo: {prompt}" + "".join(f"\n[{r.tool_name} -> {r.content}]" for r in returns)
    if any(line.strip() == "/call note" for line in prompt.splitlines()):
        return ToolCallPart("note", {"text": "before the gate"})
    return f"echo: {prompt}"


async def streamed_whole(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    reply = _streamed_reply(messages)
    if isinstance(reply, ToolCallPart):
        return ModelResponse(parts=[reply])
    async with _gate(last_prompt(messages)) as reader:
        await _wait_for_go(reader)
    return ModelResponse(parts=[TextPart(reply)])


async def streamed(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    reply = _streamed_reply(messages)
    if isinstance(reply, ToolCallPart):
        yield {0: DeltaToolCall(reply.tool_name, reply.args_as_json_str())}
        return
    pieces = chunks(reply)
    half = len(pieces) // 2
    async with _gate(last_prompt(messages)) as reader:
        for piece in pieces[:half]:
            yield piece
        await _wait_for_go(reader)
        for piece in pieces[half:]:
            yield piece


AGENTS = [
    AgentSpec(name="burst", model=FunctionModel(burst, model_name="burst")),
    AgentSpec(name="gated", model=FunctionModel(gated, model_name="gated")),
    AgentSpec(
        name="streamed",
        model=FunctionModel(streamed_whole, stream_function=streamed, model_name="streamed"),
        tools=(note,),
    ),
]
