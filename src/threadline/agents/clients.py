"""Model providers' HTTP clients, shared by every agent of the process and closed with it.

Left to itself, each pydantic-ai provider builds its own HTTP client: every model string gets a
connection pool of its own (1,000 connections, 100 kept alive), and two agents on one endpoint
keep two pools. Here there is one client per provider family and endpoint: the families read
their base URL and key from the environment once per process, so a family is one (base URL,
key); an ``openai-compat:`` endpoint is keyed by its base URL and key explicitly.

Every client's pool is sized to the runs that can be in flight (``pool_size``: the pinned
``MAX_CONCURRENT_RUNS``, or ``ADAPTIVE_RUNS_MAX`` with ``auto``): each run has at most one
model request open, so that many connections are kept alive and none is opened and closed per
turn under load. The transport is
httpx (httpx2, pydantic-ai's default) or aiohttp through the OpenAI SDK's
``DefaultAioHttpClient`` (``THREADLINE_PROVIDER_HTTP``) for OpenAI and Anthropic, whose SDKs
ship it (the same vendored transport). Google's SDK ships none, and Groq's still takes a
legacy ``httpx.AsyncClient``: those two are always on httpx.

The SDKs are imported when a model first needs one (at start-up, when the registry builds
every agent's model), as pydantic-ai imports its own provider modules: the OpenAI and Groq
SDKs were a quarter of every process's start-up imports, paid by servers on the echo model
and by every CLI command too.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Literal

import httpx
import httpx2
from pydantic_ai._http import DEFAULT_HTTP_TIMEOUT, ConnectPoolTimeoutCap
from pydantic_ai.models import get_user_agent
from pydantic_ai.providers import Provider, infer_provider

from threadline.errors import ConfigError

if TYPE_CHECKING:
    from openai import AsyncOpenAI

Transport = Literal["httpx", "aiohttp"]
# "per-model": what pydantic-ai and the SDKs do left to themselves (a client per model, their
# default pools), kept so that A/B measurements can compare.
Sharing = Literal["shared", "per-model"]

# pydantic-ai provider names that read the same environment, so share one client.
_FAMILIES = {
    "openai": "openai",
    "openai-chat": "openai",
    "openai-responses": "openai",
    "anthropic": "anthropic",
    "google": "google",
    "google-gla": "google",
    "groq": "groq",
}


class ProviderClients:
    """One HTTP client per provider family or compatible endpoint; ``aclose()`` closes them all."""

    def __init__(
        self, *, pool_size: int = 32, transport: Transport = "httpx", sharing: Sharing = "shared"
    ) -> None:
        self.pool_size = pool_size
        self.transport = transport
        self.sharing = sharing
        # Per-model SDK clients (``sharing="per-model"``), closed with the rest.
        self._sdk_clients: list[AsyncOpenAI] = []
        self._http: list[httpx2.AsyncClient | httpx.AsyncClient] = []
        self._compat: dict[tuple[str, str], AsyncOpenAI] = {}
        self._providers: dict[str, Provider[Any]] = {}

    @property
    def limits(self) -> httpx2.Limits:
        return httpx2.Limits(
            max_connections=self.pool_size, max_keepalive_connections=self.pool_size
        )

    def http_client(self, *, aiohttp: bool = True) -> httpx2.AsyncClient:
        """A new pooled client, with pydantic-ai's timeouts and user agent, closed by ``aclose``;
        on aiohttp if so configured and ``aiohttp`` (the SDK's support for it)."""
        timeout = httpx2.Timeout(DEFAULT_HTTP_TIMEOUT, connect=5)
        client_class: type[httpx2.AsyncClient] = httpx2.AsyncClient
        if self.transport == "aiohttp" and aiohttp:
            from openai import DefaultAioHttpClient

            client_class = DefaultAioHttpClient
        client = client_class(
            timeout=timeout,
            limits=self.limits,
            headers={"User-Agent": get_user_agent()},
            # As pydantic-ai's own clients: a request's scalar timeout never lengthens the
            # connect and pool timeouts.
            event_hooks={
                "request": [ConnectPoolTimeoutCap(connect=timeout.connect, pool=timeout.pool)]
            },
        )
        self._http.append(client)
        return client

    def _legacy_http_client(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(DEFAULT_HTTP_TIMEOUT, connect=5),
            limits=httpx.Limits(
                max_connections=self.pool_size, max_keepalive_connections=self.pool_size
            ),
            headers={"User-Agent": get_user_agent()},
        )
        self._http.append(client)
        return client

    def compat(self, base_url: str, key_var: str | None) -> AsyncOpenAI:
        """The client of an OpenAI-compatible endpoint (``compat_client``), one per base URL
        and key."""
        key = ""
        if key_var is not None:
            key = os.environ.get(key_var, "")
            if not key:
                raise ConfigError(f"model endpoint {base_url!r} needs {key_var}")
        from threadline.agents.completions import compat_client

        if self.sharing == "per-model":
            own = compat_client(base_url, key, None)
            self._sdk_clients.append(own)
            return own
        shared = self._compat.get((base_url, key))
        if shared is None:
            shared = compat_client(base_url, key, self.http_client())
            self._compat[(base_url, key)] = shared
        return shared

    def provider(self, name: str) -> Provider[Any]:
        """The provider named ``name`` on a shared client: ``infer_model``'s provider factory."""
        family = _FAMILIES.get(name)
        if family is None or self.sharing == "per-model":
            return infer_provider(name)
        provider = self._providers.get(name)
        if provider is None:
            provider = self._providers[name] = self._build_provider(name, family)
        return provider

    def _build_provider(self, name: str, family: str) -> Provider[Any]:
        # The same family's providers share the client of the first one built.
        shared = next((p for n, p in self._providers.items() if _FAMILIES.get(n) == family), None)
        if family == "openai":
            from pydantic_ai.providers.openai import OpenAIProvider

            from threadline.agents.completions import PlainBodyOpenAI

            if shared is not None:
                return OpenAIProvider(openai_client=shared.client)
            http = self.http_client()
            # pydantic-ai's provider reads the environment and checks the key; its client is
            # built again as a PlainBodyOpenAI from what it found (the SDK reads the rest of
            # the environment itself, as it did): no request transform (completions.py).
            checked = OpenAIProvider(http_client=http).client
            sdk = PlainBodyOpenAI(
                base_url=checked.base_url, api_key=checked.api_key, http_client=http
            )
            return OpenAIProvider(openai_client=sdk)
        if family == "anthropic":
            from anthropic import AsyncAnthropic
            from pydantic_ai.providers.anthropic import AnthropicProvider

            from threadline.agents.anthropic_client import ValidatingAnthropic

            if shared is not None:
                return AnthropicProvider(anthropic_client=shared.client)
            http = self.http_client()
            # As for openai: pydantic-ai reads and checks the environment, the client is built
            # again as one that validates what it receives (anthropic_client.py).
            read = AnthropicProvider(http_client=http).client
            assert isinstance(read, AsyncAnthropic)  # what it builds from a key
            anthropic_sdk = ValidatingAnthropic(
                api_key=read.api_key, base_url=read.base_url, http_client=http
            )
            return AnthropicProvider(anthropic_client=anthropic_sdk)
        if family == "google":
            from pydantic_ai.providers.google import GoogleProvider

            if shared is not None:
                return GoogleProvider(client=shared.client)
            # google-genai ships no aiohttp client of its own: the OpenAI SDK's is not tried
            # under it.
            return GoogleProvider(http_client=self.http_client(aiohttp=False))
        from pydantic_ai.providers.groq import GroqProvider

        from threadline.agents.completions import PlainBodyGroq

        if shared is not None:
            return GroqProvider(groq_client=shared.client)
        legacy = self._legacy_http_client()
        # As for openai: pydantic-ai reads and checks the environment, the client is built
        # again without the request transform (completions.py).
        found = GroqProvider(http_client=legacy).client
        groq_sdk = PlainBodyGroq(
            base_url=str(found.base_url), api_key=found.api_key, http_client=legacy
        )
        return GroqProvider(groq_client=groq_sdk)

    async def aclose(self) -> None:
        clients, self._http = self._http, []
        sdk_clients, self._sdk_clients = self._sdk_clients, []
        self._compat.clear()
        self._providers.clear()
        for client in clients:
            await client.aclose()
        for sdk_client in sdk_clients:
            await sdk_client.close()
