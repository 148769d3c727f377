"""Request URLs of a Stainless SDK client, prepared once per path.

Every request of the OpenAI, Groq and Anthropic SDKs joins its path to the client's base URL
in ``_prepare_url``: httpx parses the path, then the joined URL, from their strings, ~38 µs
of a ~0.7 ms call here (1 µs kept), for the one path an agent's requests all use. The result is an
immutable ``URL`` of the base URL and the path alone (the query goes on later), so it is kept
per path, and dropped when the base URL is replaced (the SDK's ``base_url`` setter).
"""

from __future__ import annotations

from typing import Any

_KEPT_PATHS = 16


class PreparedUrls:
    """A Stainless SDK client's mixin: ``_prepare_url`` keeps what it prepared, per path."""

    _prepared: dict[str, Any]
    _prepared_for: object = None

    def _prepare_url(self, url: str) -> Any:
        base = self.base_url  # type: ignore[attr-defined]
        if base is not self._prepared_for:
            self._prepared, self._prepared_for = {}, base
        prepared = self._prepared.get(url)
        if prepared is None:
            sdk: Any = super()
            prepared = sdk._prepare_url(url)
            # An agent's requests use one or two paths; a client used for more (a path per
            # file id) keeps only its first few.
            if len(self._prepared) < _KEPT_PATHS:
                self._prepared[url] = prepared
        return prepared
