"""Agents for the Responses API tests: ``THREADLINE_AGENTS_MODULE=tests.openai_api.agents``.

* ``instructed`` answers with the instructions its model was given and the prompt, so a test
  sees the agent's own instructions and what a request appended; a prompt with parts of a
  burst it holds back as ``burst`` does.
* ``burst`` answers (``echo: <prompt>``, streamed if asked) only when its prompt holds every
  part of a burst (``part I/N of TAG``, as in ``tests/mp_agents.py``); any other call waits
  until its run is superseded or cancelled (streamed, it says ``WAITING`` first). A burst is
  thus answered by one model call, whatever the timing, and a lone ``part 1/2`` is a run in
  flight until someone ends it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCalls, FunctionModel

from tests.mp_agents import PART, burst_complete
from threadline.agents import AgentSpec
from threadline.agents.echo import chunks, last_prompt

AGENT_INSTRUCTIONS = "You are the test agent."
WAITING = "waiting for the rest of the burst"


async def instructed(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    prompt = last_prompt(messages)
    if PART.search(prompt):
        await _whole_burst(messages)
    text = f"instructions: {info.instructions} | echo: {prompt}"
    return ModelResponse(parts=[TextPart(text)])


async def _whole_burst(messages: list[ModelMessage]) -> str:
    prompt = last_prompt(messages)
    if not burst_complete(prompt):
        await asyncio.Event().wait()  # until the run is superseded or cancelled
    return f"echo: {prompt}"


async def burst(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    return ModelResponse(parts=[TextPart(await _whole_burst(messages))])


async def burst_streamed(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    if not burst_complete(last_prompt(messages)):
        yield WAITING  # streamed text that the merged run's reply replaces
    for piece in chunks(await _whole_burst(messages)):
        yield piece


AGENTS = [
    AgentSpec(
        name="instructed",
        instructions=AGENT_INSTRUCTIONS,
        model=FunctionModel(instructed, model_name="instructed"),
    ),
    AgentSpec(
        name="burst",
        model=FunctionModel(burst, stream_function=burst_streamed, model_name="burst"),
    ),
]
