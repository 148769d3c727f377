"""OpenAI and Groq clients whose Chat Completions skip the SDK's client-side request transform
and build their responses by validating them.

Before it sends a request, the OpenAI SDK walks the whole body (every message, every tool's
JSON schema) against the annotations of its ``CompletionCreateParams`` TypedDicts, to rename
and reformat fields that declare it (``PropertyInfo``). The bodies pydantic-ai builds are plain
JSON already, so the walk changes nothing; it cost ~16 % of a provider turn's server CPU here
(docs/performance.md, "Where a provider turn's CPU goes"). ``create`` here does what the
SDK's generated ``create`` does, minus the walk: it posts the given fields as they are
through the SDK's own ``_post``, with the request options built by the SDK's
``make_request_options``, so retries, headers, errors and streams are the SDK's. (Earlier
the fields went through ``extra_body`` past a ``create`` that still walked its ~40 omitted
arguments: ~7 % of a call's profiled time.) tests/agents/test_clients.py holds the bodies
and headers a server receives to those of the plain SDK clients. Used for ``openai-compat:``
endpoints and the ``openai`` and ``groq`` provider families (``clients.py``): Groq's SDK is
generated the same way and walks its bodies the same way. Anthropic's (2.x) sends its
message bodies as given, so it needs nothing of this.

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
from groq._base_client import make_request_options as groq_request_options
from groq.resources.chat import AsyncChat as AsyncGroqChat
from groq.resources.chat import AsyncCompletions as AsyncGroqCompletions
from groq.types.chat import ChatCompletion as GroqChatCompletion
from groq.types.chat import ChatCompletionChunk as GroqChatCompletionChunk
from openai import AsyncOpenAI, AsyncStream, NotGiven, Omit
from openai._base_client import make_request_options
from openai.resources.chat import AsyncChat, AsyncCompletions
from openai.resources.chat.completions.completions import validate_response_format
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from threadline.agents.urls import PreparedUrls
from threadline.agents.validation import ValidatingClient, Validator, model_validators

# ``create``'s arguments that are request options, not body fields.
_OPTIONS = ("extra_headers", "extra_query", "extra_body", "timeout")


async def _post_as_is(
    resource: Any,
    path: str,
    params: dict[str, Any],
    given: Callable[[object], bool],
    options: Callable[..., Any],
    types: tuple[type[Any], type[Any]],
) -> Any:
    """What the SDK's ``create`` does, minus the transform: ``resource._post`` of every given
    body field as it is, with the request options made by the SDK's ``make_request_options``
    (``options``). ``types`` are the completion's class and the stream's."""
    body: dict[str, Any] = {}
    request: dict[str, Any] = {}
    for name, value in params.items():
        if name in _OPTIONS:
            request[name] = value
        elif given(value):
            body[name] = value
    completion, stream_class = types
    return await resource._post(
        path,
        body=body,
        options=options(**request),
        cast_to=completion,
        stream=bool(body.get("stream")),
        stream_cls=stream_class,
    )


def _openai_given(value: object) -> bool:
    return not isinstance(value, Omit | NotGiven)


def _groq_given(value: object) -> bool:
    return not isinstance(value, groq.Omit | groq.NotGiven)


def _openai_options(**request: Any) -> Any:
    # As the SDK's own create(): chat requests carry the API key.
    return make_request_options(**request, security={"bearer_auth": True})


_OPENAI_TYPES = (ChatCompletion, AsyncStream[ChatCompletionChunk])
_GROQ_TYPES = (GroqChatCompletion, groq.AsyncStream[GroqChatCompletionChunk])


class _Completions(AsyncCompletions):
    async def create(self, **params: Any) -> Any:
        validate_response_format(params.get("response_format"))
        return await _post_as_is(
            self, "/chat/completions", params, _openai_given, _openai_options, _OPENAI_TYPES
        )


class _Chat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return _Completions(self._client)


_OPENAI_VALIDATED = model_validators(ChatCompletion, ChatCompletionChunk)
_GROQ_VALIDATED = model_validators(GroqChatCompletion, GroqChatCompletionChunk)


class PlainBodyOpenAI(PreparedUrls, ValidatingClient, AsyncOpenAI):
    """``AsyncOpenAI`` whose ``chat.completions.create`` sends its body as given and validates
    what comes back."""

    @cached_property
    def chat(self) -> AsyncChat:
        return _Chat(self)

    def response_validators(self) -> tuple[Validator, ...]:
        return _OPENAI_VALIDATED


class _GroqCompletions(AsyncGroqCompletions):
    async def create(self, **params: Any) -> Any:
        return await _post_as_is(
            self,
            "/openai/v1/chat/completions",
            params,
            _groq_given,
            groq_request_options,
            _GROQ_TYPES,
        )


class _GroqChat(AsyncGroqChat):
    @cached_property
    def completions(self) -> AsyncGroqCompletions:
        return _GroqCompletions(self._client)


class PlainBodyGroq(PreparedUrls, ValidatingClient, groq.AsyncGroq):
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
