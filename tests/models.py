"""Test models whose timing the test controls with events, never with sleeps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from threadline.agents.echo import chunks, last_prompt


@dataclass
class GatedModel:
    """Echoes the prompt, but only when ``ready(prompt)`` holds or ``release`` is set.

    Other calls wait until they are cancelled, which is what a superseded run looks like.
    ``fail_next`` makes the next answered call raise a provider error instead.
    """

    expect: tuple[str, ...] = ()
    release: asyncio.Event = field(default_factory=asyncio.Event)
    called: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = 0
    completed: int = 0
    cancelled: int = 0
    prompts: list[str] = field(default_factory=list)
    histories: list[list[ModelMessage]] = field(default_factory=list)
    fail_next: bool = False

    def ready(self, prompt: str) -> bool:
        return bool(self.expect) and all(text in prompt for text in self.expect)

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = last_prompt(messages)
        self.started += 1
        self.prompts.append(prompt)
        self.histories.append(messages)
        self.called.set()
        if not self.ready(prompt):
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        if self.fail_next:
            self.fail_next = False
            raise ModelHTTPError(status_code=500, model_name="gated", body="boom")
        self.completed += 1
        return ModelResponse(parts=[TextPart(f"echo: {prompt}")])

    def model(self) -> FunctionModel:
        return FunctionModel(self, model_name="gated")


@dataclass
class ToolThenHangModel:
    """Calls ``tool`` on the first request, then hangs after the tool returned (until cancelled)
    unless the prompt contains ``finish``; records every history it was given."""

    tool: str
    finish: str
    after_tool: asyncio.Event = field(default_factory=asyncio.Event)
    histories: list[list[ModelMessage]] = field(default_factory=list)

    async def __call__(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        self.histories.append(messages)
        prompt = last_prompt(messages)
        returned = any(isinstance(p, ToolReturnPart) for p in messages[-1].parts)
        if self.finish in prompt:
            return ModelResponse(parts=[TextPart(f"echo: {prompt}")])
        if not returned:
            return ModelResponse(parts=[ToolCallPart(self.tool, {})])
        self.after_tool.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def model(self) -> FunctionModel:
        return FunctionModel(self, model_name="tool-then-hang")


@dataclass
class StreamGate:
    """Replies ``echo: <prompt>`` in word chunks when streamed: the first chunk at once, the
    rest once ``release`` is set or at once when the prompt holds every ``expect`` text.

    A call left waiting is what a superseded or cancelled run looks like: it counts in
    ``cancelled`` when it is cancelled. Not streamed, it answers like ``GatedModel``.
    """

    expect: tuple[str, ...] = ()
    release: asyncio.Event = field(default_factory=asyncio.Event)
    streaming: asyncio.Event = field(default_factory=asyncio.Event)
    called: asyncio.Event = field(default_factory=asyncio.Event)
    started: int = 0
    completed: int = 0
    cancelled: int = 0

    def _ready(self, prompt: str) -> bool:
        return bool(self.expect) and all(text in prompt for text in self.expect)

    async def _wait(self, prompt: str) -> None:
        if self._ready(prompt):
            return
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def _answer(self, messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = last_prompt(messages)
        self.started += 1
        self.called.set()
        await self._wait(prompt)
        self.completed += 1
        return ModelResponse(parts=[TextPart(f"echo: {prompt}")])

    async def _stream(self, messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        prompt = last_prompt(messages)
        self.started += 1
        self.called.set()
        first, *rest = chunks(f"echo: {prompt}")
        yield first
        self.streaming.set()
        await self._wait(prompt)
        for piece in rest:
            yield piece
        self.completed += 1

    def model(self) -> FunctionModel:
        return FunctionModel(self._answer, stream_function=self._stream, model_name="stream-gate")
