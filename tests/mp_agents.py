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
"""

from __future__ import annotations

import asyncio
import json
import re

from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from threadline.agents import AgentSpec
from threadline.agents.echo import last_prompt

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


async def gated(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = last_prompt(messages)
    found = GATE.search(prompt)
    if found is None:
        raise ValueError(f"no 'gate PORT' line in {prompt!r}")
    reader, writer = await asyncio.open_connection("127.0.0.1", int(found.group(1)))
    try:
        writer.write(json.dumps({"prompt": prompt}).encode() + b"\n")
        await writer.drain()
        if not await reader.readline():
            await asyncio.Event().wait()  # the test went away without opening the gate
    finally:
        writer.close()
    return ModelResponse(parts=[TextPart(f"echo: {prompt}")])


AGENTS = [
    AgentSpec(name="burst", model=FunctionModel(burst, model_name="burst")),
    AgentSpec(name="gated", model=FunctionModel(gated, model_name="gated")),
]
