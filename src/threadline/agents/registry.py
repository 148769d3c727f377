"""The agent registry: immutable specs in, ready-to-run pydantic-ai agents out.

A pydantic-ai ``Agent`` holds no per-run state (messages and deps are passed to each run), so
one is built per spec and shared; what differs per request travels in a fresh ``RunDeps``.
Building costs ~0.5 ms of CPU here, a sixth of a whole run, which is why it is cached rather
than rebuilt per request.

``start()`` builds every agent and runs every ``spec.setup`` before the server is ready, so a
missing provider key or a failing setup stops start-up with a ``ConfigError`` naming the
agent, instead of failing requests. ``get()`` still loads lazily for a registry that was not
started: single-flight (200 concurrent first requests run ``setup`` once), and a failure there
is an ``AgentUnavailable`` remembered for ``retry_after_s``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from pydantic_ai import Agent
from pydantic_ai.models import Model, ModelRequestParameters, infer_model
from pydantic_ai.models.instrumented import InstrumentationSettings

from threadline.agents.builtin import BUILTIN_AGENTS
from threadline.agents.clients import ProviderClients
from threadline.agents.echo import MODEL_NAME as ECHO_MODEL
from threadline.agents.echo import ModelCallStats, echo_model
from threadline.agents.parameters import first_request_parameters, static_tools
from threadline.agents.spec import AgentSpec, RunDeps
from threadline.agents.tool_errors import TOOL_ERRORS
from threadline.errors import AgentNotFound, AgentUnavailable, ConfigError

log = logging.getLogger(__name__)

OPENAI_COMPAT = "openai-compat:"
# "openai-compat:MODEL@BASE_URL#KEY_VAR": the endpoint's key is read from KEY_VAR, and only
# from there. A base URL never has a fragment, so "#" cannot be part of one.
_KEY_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# pydantic-ai's wording for a provider without its key: "Set the `OPENAI_API_KEY` environment
# variable or pass it via ...".
_MISSING_KEY = re.compile(r"Set the `(\w+)` environment variable")


@dataclass(frozen=True, slots=True)
class LoadedAgent:
    spec: AgentSpec
    agent: Agent[RunDeps, str]
    model_name: str
    model: Model
    # Starts each run with one direct model request rather than the agent's graph
    # (``runner.py``): THREADLINE_DIRECT_MODEL_REQUESTS is on and the agent's tools are the
    # same on every run. ``parameters``: that request's, as the graph sends them.
    direct: bool = False
    parameters: ModelRequestParameters | None = None


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
        retry_after_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        instrument: InstrumentationSettings | None = None,
        clients: ProviderClients | None = None,
        direct: bool = False,
    ) -> None:
        self._specs = {spec.name: spec for spec in specs}
        self._default_model = default_model
        self._echo_delay_s = echo_delay_s
        self.stats = stats if stats is not None else ModelCallStats()
        self._loaded: dict[str, LoadedAgent] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._models: dict[str, Model] = {}
        # The provider clients of every model built here, shared by agents on one endpoint;
        # owned by the registry and closed with it (so with the app): no connection outlives it.
        self.clients = clients if clients is not None else ProviderClients()
        self._direct = direct
        # name -> when its lazy load last failed. Requests within ``retry_after_s`` of that get
        # 503 at once instead of rerunning the setup: a broken dependency is not hammered by
        # every request, and callers do not each wait for a setup that is bound to fail.
        self._failures: dict[str, float] = {}
        self._retry_after_s = retry_after_s
        self._clock = clock
        # Tracing's (``tracing.py``); None leaves pydantic-ai's default (not instrumented
        # unless the application called ``Agent.instrument_all``).
        self._instrument = instrument
        self.init_count = 0

    @property
    def specs(self) -> list[AgentSpec]:
        return list(self._specs.values())

    def spec(self, name: str) -> AgentSpec:
        try:
            return self._specs[name]
        except KeyError:
            raise AgentNotFound(f"agent {name!r} is not registered") from None

    async def start(self) -> None:
        """Build every agent and run every setup; ``ConfigError`` names the agent that failed."""
        # Every model first: a configuration error should not wait for (or follow) setups.
        # In a thread: pydantic-ai imports a provider's SDK on first use, reading files.
        built = await asyncio.to_thread(self._build_all)
        for name, loaded in built.items():
            if name in self._loaded:
                continue
            self.init_count += 1
            setup = loaded.spec.setup
            if setup is not None:
                try:
                    await setup()
                except Exception as exc:
                    raise ConfigError(f"agent {name!r}: setup failed: {exc!r}") from exc
            self._loaded[name] = await self._ready(loaded)

    def check(self) -> None:
        """Build every agent's model without running setups: a configuration check."""
        self._build_all()

    def _build_all(self) -> dict[str, LoadedAgent]:
        return {spec.name: self._build(spec) for spec in self._specs.values()}

    async def get(self, name: str) -> LoadedAgent:
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        spec = self.spec(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            loaded = self._loaded.get(name)
            if loaded is None:
                failed_at = self._failures.get(name)
                if failed_at is not None:
                    wait = self._retry_after_s - (self._clock() - failed_at)
                    if wait > 0:
                        raise AgentUnavailable(name, math.ceil(wait))
                self.init_count += 1
                try:
                    if spec.setup is not None:
                        await spec.setup()
                    loaded = self._loaded[name] = await self._ready(self._build(spec))
                except Exception as exc:
                    # The cause stays in the log: it may name hosts or credentials.
                    log.exception("agent %r failed to load", name)
                    self._failures[name] = self._clock()
                    raise AgentUnavailable(name, math.ceil(self._retry_after_s)) from exc
                self._failures.pop(name, None)
        return loaded

    async def aclose(self) -> None:
        await self.clients.aclose()

    def _build(self, spec: AgentSpec) -> LoadedAgent:
        try:
            model, model_name = self._model(spec.model)
        except ConfigError as exc:
            raise ConfigError(f"agent {spec.name!r}: {exc}") from exc
        agent: Agent[RunDeps, str] = Agent(
            model,
            instructions=spec.instructions or None,
            deps_type=RunDeps,
            output_type=str,
            tools=spec.tools,
            model_settings=spec.model_settings,
            name=spec.name,
            # On the agent, not per run: a run's own capabilities are composed on every run
            # (about 0.25 ms of CPU each, measured in-process), the agent's once. Only where a
            # tool can fail.
            capabilities=[TOOL_ERRORS] if spec.tools else None,
        )
        direct = self._direct and static_tools(spec.tools)
        return LoadedAgent(spec, agent, model_name, model, direct)

    async def _ready(self, loaded: LoadedAgent) -> LoadedAgent:
        """Read the direct path's request parameters off the agent's graph, then instrument
        it (after: the probe run is nobody's trace, unless the application instruments every
        agent with ``Agent.instrument_all``)."""
        if loaded.direct:
            try:
                parameters = await first_request_parameters(loaded.agent)
            except Exception as exc:
                raise ConfigError(f"agent {loaded.spec.name!r}: {exc!r}") from exc
            loaded = replace(loaded, parameters=parameters)
        if self._instrument is not None:
            loaded.agent.instrument = self._instrument
        return loaded

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
            from pydantic_ai.models.openai import OpenAIChatModel
            from pydantic_ai.providers.openai import OpenAIProvider

            model_name, base_url, key_var = parse_openai_compat(name)
            provider = OpenAIProvider(openai_client=self.clients.compat(base_url, key_var))
            return OpenAIChatModel(model_name, provider=provider)
        try:
            return infer_model(name, provider_factory=self.clients.provider)
        except Exception as exc:
            # pydantic-ai names the variable it looked for; its message never holds a key.
            missing = _MISSING_KEY.search(str(exc))
            if missing:
                raise ConfigError(f"model {name!r} needs {missing[1]}") from exc
            raise ConfigError(f"cannot use model {name!r}: {exc}") from exc


def parse_openai_compat(name: str) -> tuple[str, str, str | None]:
    """``openai-compat:MODEL@BASE_URL[#KEY_VAR]`` (Ollama, vLLM, LM Studio and friends) as
    (model, base URL, the variable holding the endpoint's key or None)."""
    model_name, sep, rest = name[len(OPENAI_COMPAT) :].partition("@")
    base_url, hashed, key_var = rest.partition("#")
    if not sep or not model_name or not base_url or (hashed and not _KEY_VAR.fullmatch(key_var)):
        raise ConfigError(
            f"expected {OPENAI_COMPAT}MODEL@BASE_URL or {OPENAI_COMPAT}MODEL@BASE_URL#KEY_VAR "
            f"(KEY_VAR an environment variable's name), got {name!r}"
        )
    return model_name, base_url, key_var or None
