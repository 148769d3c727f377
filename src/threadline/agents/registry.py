"""The agent registry: immutable specs in, ready-to-run pydantic-ai agents out.

A pydantic-ai ``Agent`` holds no per-run state (messages and deps are passed to each run), so
one is built per spec on first use and shared; what differs per request travels in a fresh
``RunDeps``. Building costs ~0.5 ms of CPU here, a sixth of a whole run, which is why it is
cached rather than rebuilt per request. First use is single-flight: 200 concurrent first
requests run ``spec.setup`` and build the model once.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Iterable
from dataclasses import dataclass

from openai import AsyncOpenAI
from pydantic_ai import Agent
from pydantic_ai.models import Model, infer_model

from threadline.agents.builtin import BUILTIN_AGENTS
from threadline.agents.echo import MODEL_NAME as ECHO_MODEL
from threadline.agents.echo import ModelCallStats, echo_model
from threadline.agents.spec import AgentSpec, RunDeps
from threadline.errors import AgentNotFound, ConfigError

OPENAI_COMPAT = "openai-compat:"


@dataclass(frozen=True, slots=True)
class LoadedAgent:
    spec: AgentSpec
    agent: Agent[RunDeps, str]
    model_name: str


def load_specs(module_name: str | None) -> list[AgentSpec]:
    """Built-in specs plus ``AGENTS`` from the user's module; a user spec overrides by name."""
    specs = {spec.name: spec for spec in BUILTIN_AGENTS}
    if module_name:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ConfigError(f"THREADLINE_AGENTS_MODULE={module_name!r}: {exc}") from exc
        user_specs = getattr(module, "AGENTS", None)
        if not isinstance(user_specs, list | tuple) or not all(
            isinstance(s, AgentSpec) for s in user_specs
        ):
            raise ConfigError(f"module {module_name!r} must define AGENTS: list[AgentSpec]")
        specs.update({spec.name: spec for spec in user_specs})
    return list(specs.values())


class AgentRegistry:
    def __init__(
        self,
        specs: Iterable[AgentSpec],
        *,
        default_model: str,
        echo_delay_s: float = 0.0,
        stats: ModelCallStats | None = None,
    ) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._default_model = default_model
        self._echo_delay_s = echo_delay_s
        self.stats = stats if stats is not None else ModelCallStats()
        self._loaded: dict[str, LoadedAgent] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._models: dict[str, Model] = {}
        # Provider clients this registry created; closed with the app so no connection
        # outlives it.
        self._clients: list[AsyncOpenAI] = []
        self.init_count = 0

    @property
    def specs(self) -> list[AgentSpec]:
        return list(self._specs.values())

    def spec(self, name: str) -> AgentSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise AgentNotFound(f"agent {name!r} is not registered") from None

    async def get(self, name: str) -> LoadedAgent:
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        spec = self.spec(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(name)
            if loaded is None:
                self.init_count += 1
                if spec.setup is not None:
                    await spec.setup()
                model, model_name = self._model(spec.model)
                agent: Agent[RunDeps, str] = Agent(
                    model,
                    instructions=spec.instructions or None,
                    deps_type=RunDeps,
                    output_type=str,
                    tools=spec.tools,
                    model_settings=spec.model_settings,
                    name=spec.name,
                )
                loaded = self._loaded[name] = LoadedAgent(spec, agent, model_name)
        return loaded

    async def aclose(self) -> None:
        for client in self._clients:
            await client.close()
        self._clients.clear()

    def _model(self, model: str | Model | None) -> tuple[Model, str]:
        if isinstance(model, Model):
            return model, model.model_name
        name = model or self._default_model
        cached = self._models.get(name)
        if cached is None:
            cached = self._models[name] = self._build_model(name)
        return cached, name

    def _build_model(self, name: str) -> Model:
        if name == ECHO_MODEL:
            return echo_model(self._echo_delay_s, self.stats)
        if name.startswith(OPENAI_COMPAT):
            # "openai-compat:MODEL@BASE_URL" for Ollama, vLLM, LM Studio and friends.
            from pydantic_ai.models.openai import OpenAIChatModel
            from pydantic_ai.providers.openai import OpenAIProvider

            model_name, sep, base_url = name[len(OPENAI_COMPAT) :].partition("@")
            if not sep or not model_name or not base_url:
                raise ConfigError(f"expected {OPENAI_COMPAT}MODEL@BASE_URL, got {name!r}")
            api_key = os.environ.get("OPENAI_API_KEY", "not-needed")
            client = AsyncOpenAI(base_url=base_url, api_key=api_key)
            self._clients.append(client)
            provider = OpenAIProvider(openai_client=client)
            return OpenAIChatModel(model_name, provider=provider)
        try:
            return infer_model(name)
        except Exception as exc:
            raise ConfigError(f"cannot use model {name!r}: {exc}") from exc
