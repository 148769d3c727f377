"""An OpenAI client whose Chat Completions requests skip the SDK's client-side transform.

Before it sends a request, the OpenAI SDK walks the whole body (every message, every tool's
JSON schema) against the annotations of its ``CompletionCreateParams`` TypedDicts, to rename
and reformat fields that declare it (``PropertyInfo``). The bodies pydantic-ai builds are plain
JSON already, so the walk changes nothing; it cost ~16 % of a provider turn's server CPU here
(docs/performance.md, "Where a provider turn's CPU goes"). ``messages`` and ``tools``, the
large fields, go out through the SDK's own ``extra_body`` instead, which it merges into the
JSON body unchanged; everything else takes the usual path. tests/agents/test_clients.py holds
the bodies a server receives to those of a plain ``AsyncOpenAI``. Used for ``openai-compat:``
endpoints and the ``openai`` provider family (``clients.py``).
"""

from __future__ import annotations

from typing import Any

from openai import AsyncOpenAI, NotGiven, Omit
from openai._compat import cached_property
from openai.resources.chat import AsyncChat, AsyncCompletions

# The fields of a chat completion body passed through as they are: the large ones.
_AS_IS = ("messages", "tools")


class _Completions(AsyncCompletions):
    async def create(self, **params: Any) -> Any:
        body = dict(params.pop("extra_body", None) or {})
        for name in _AS_IS:
            value = params.pop(name, None)
            if value is not None and not isinstance(value, Omit | NotGiven):
                body.setdefault(name, value)
        # ``messages`` is required by the signature; extra_body's replaces it in the body.
        return await super().create(messages=[], extra_body=body, **params)


class _Chat(AsyncChat):
    @cached_property
    def completions(self) -> AsyncCompletions:
        return _Completions(self._client)


class PlainBodyOpenAI(AsyncOpenAI):
    """``AsyncOpenAI`` whose ``chat.completions.create`` sends messages and tools as given."""

    @cached_property
    def chat(self) -> AsyncChat:
        return _Chat(self)
