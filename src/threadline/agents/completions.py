"""OpenAI and Groq clients whose Chat Completions skip the SDK's client-side request transform
and build their responses by validating them.

Before it sends a request, the OpenAI SDK walks the whole body (every message, every tool's
JSON schema) against the annotations of its ``CompletionCreateParams`` TypedDicts, to rename
and reformat fields that declare it (``PropertyInfo``). The bodies pydantic-ai builds are plain
JSON already, so the walk changes nothing; it cost ~16 % of a provider turn's server CPU here
(docs/performance.md, "Where a provider turn's CPU goes"). The body's fields go out through
the SDK's own ``extra_body`` instead, which it merges into the JSON body unchanged; only
``stream`` and the request options take the usual path. tests/agents/test_clients.py holds
the bodies a server receives to those of the plain SDK clients. Used for ``openai-compat:``
endpoints and the ``openai`` and ``groq`` provider families (``clients.py``): Groq's SDK is
generated the same way and walks its bodies the same way. Anthropic's (2.x) sends its
message bodies as given, so it needs nothing of this.

``model`` and ``messages``, which ``create`` requires by name, are given to it as omitted:
the transform skips omitted fields, and hashing ``model``'s annotation (a union with a
``Literal`` of every model name) on every call cost more than the rest of what it left.

On the way back, a completion and each streamed chunk are validated against the SDK's class,
not built by its ``construct_type`` (``validation.py``).

``compat_client`` builds the client of an ``openai-compat:`` endpoint. This module imports both
SDKs; ``clients.py`` imports it only when a model needs one of them.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from typing import Any

import groq
import httpx2
from groq.resources.chat import AsyncChat as AsyncGroqChat
from groq.resources.chat import AsyncCompletions as AsyncGroqCompletions
from groq.types.chat import ChatCompletion as GroqChatCompletion
from groq.types.chat import ChatCompletionChunk as GroqChatCompletionChunk
from openai import AsyncOpenAI, NotGiven, Omit, omit
from openai.resources.chat import AsyncChat, AsyncCompletions
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from threadline.agents.validation import ValidatingClient, Validator, model_validators

# ``create``'s arguments the SDK must see as such: ``stream`` (it picks the response type) and
# the request options, which are not body fields. Every other given argument is a body field
# that the transform would return unchanged: no Chat Completions request type declares an
# alias or a format (``PropertyInfo``), in either SDK.
_KEPT = frozenset({"stream", "extra_headers", "extra_query", "extra_body", "timeout"})


def _as_is(
    params: dict[str, Any], given: Callable[[object], bool], omitted: object
) -> dict[str, Any]:
    """``create``'s arguments with every body field moved into ``extra_body``; ``given``
    tells a value from the SDK's "not given" markers, ``omitted`` is one of them."""
    body = dict(params.get("extra_body") or {})
    kept: dict[str, Any] = {}
    for name, value in params.items():
        if name in _KEPT:
            kept[name] = value
        elif given(value):
            # The caller's own extra_body wins over a field, as it does in the SDK.
            body.setdefault(name, value)
    # ``model`` and ``messages`` are required by name (the SDK checks that they were passed,
    # not their values): passed as omitted, they reach the body through extra_body alone.
    return {**kept, "model": omitted, "messages": omitted, "extra_body": body}


def _openai_given(value: object) -> bool:
    return not isinstance(value, Omit | NotGiven)


def _groq_given(value: object) -> bool:
    return not isinstance(value, groq.Omit | groq.NotGiven)


class _Completions(AsyncCompletions):
    async def create(self, **params: Any) -> Any:
        return await super().create(**_as_is(params, _openai_given, omit))


class _Chat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return _Completions(self._client)


_OPENAI_VALIDATED = model_validators(ChatCompletion, ChatCompletionChunk)
_GROQ_VALIDATED = model_validators(GroqChatCompletion, GroqChatCompletionChunk)


class PlainBodyOpenAI(ValidatingClient, AsyncOpenAI):
    """``AsyncOpenAI`` whose ``chat.completions.create`` sends its body as given and validates
    what comes back."""

    @cached_property
    def chat(self) -> AsyncChat:
        return _Chat(self)

    def response_validators(self) -> tuple[Validator, ...]:
        return _OPENAI_VALIDATED


class _GroqCompletions(AsyncGroqCompletions):
    async def create(self, **params: Any) -> Any:
        return await super().create(**_as_is(params, _groq_given, groq.omit))


class _GroqChat(AsyncGroqChat):
    @cached_property
    def completions(self) -> AsyncGroqCompletions:
        return _GroqCompletions(self._client)


class PlainBodyGroq(ValidatingClient, groq.AsyncGroq):
    """``AsyncGroq`` whose ``chat.completions.create`` sends its body as given and validates
    what comes back."""

    @cached_property
    def chat(self) -> AsyncGroqChat:
        return _GroqChat(self)

    def response_validators(self) -> tuple[Validator, ...]:
        return _GROQ_VALIDATED


def compat_client(base_url: str, key: str, http_client: httpx2.AsyncClient | None) -> AsyncOpenAI:
    """A client for an OpenAI-compatible endpoint that sends it only its own key, if any, and
    its chat bodies without the SDK's transform (``PlainBodyOpenAI``).

    Left to itself the OpenAI SDK reads ``OPENAI_API_KEY``, ``OPENAI_ORG_ID`` and
    ``OPENAI_PROJECT_ID`` from the environment and sends them to whatever host ``base_url``
    names: OpenAI's key to a local model server, or to whoever runs the URL. Every credential
    and identifier is therefore given explicitly, and the headers they would fill are omitted.
    """
    # Sent explicitly by the SDK from the environment otherwise; never this endpoint's.
    omitted: dict[str, str] = {"OpenAI-Organization": Omit(), "OpenAI-Project": Omit()}  # type: ignore[dict-item]
    client_class = PlainBodyOpenAI if key else _KeylessOpenAI
    return client_class(
        base_url=base_url,
        api_key=key,
        # Not None, or the SDK would read OPENAI_ADMIN_KEY; never sent on chat requests.
        admin_api_key="",
        default_headers=omitted,
        http_client=http_client,
    )


class _KeylessOpenAI(PlainBodyOpenAI):
    """An OpenAI client that sends no ``Authorization`` header: a local model server needs
    none. (With an empty key the SDK leaves the header out, then refuses to send a request
    without it unless each request omits it explicitly; this skips that check.)"""

    def _validate_headers(self, headers: Any, custom_headers: Any) -> None:
        return None
