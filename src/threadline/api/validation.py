"""What the stores can hold, checked at the edge so that bad input is a 422, never a 500.

PostgreSQL refuses a NUL character in ``text`` and in ``jsonb`` (keys and values alike), and
``jsonb`` refuses NaN and +-Infinity, which Python's ``json`` happily parses. A lone surrogate
(``"\\ud800"`` is valid JSON) cannot be encoded to UTF-8 by either driver. SQLite would store
some of these; both stores get the same rules so that a client sees one behaviour.

The rules are stated in the OpenAPI schema too (a ``pattern`` on strings, ``propertyNames`` on
objects, a recursive ``StorableJson`` definition), so generated clients and fuzzers know them.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import AfterValidator, Field, GetJsonSchemaHandler, TypeAdapter
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from typing_extensions import TypeAliasType

# ECMA-262 syntax, as JSON Schema wants: any string without U+0000.
NUL_FREE = r"^[^\x00]*$"
# NUL-free with at least one non-whitespace character (``message_content``). Python's ``\s``
# is ``str.isspace``, the same set ``str.strip`` removes.
NOT_BLANK = r"^[^\x00]*[^\s\x00][^\x00]*$"
# Deeper nesting than this is refused: Python's JSON encoder recurses once per level and the
# stores re-encode payloads, so an unbounded depth ends in RecursionError. Real payloads (chat
# channel envelopes, tool context) are a few levels deep.
MAX_JSON_DEPTH = 64
# Largest page whose offset, (page - 1) * page_size, still fits PostgreSQL's and SQLite's
# signed 64-bit integers for the given largest page_size.
INT64_MAX = 2**63 - 1


def max_page(max_page_size: int) -> int:
    return INT64_MAX // max_page_size


def storable_text(value: str) -> str:
    """Refuse text no store can hold; the message names the problem, pydantic adds the field."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    if not _encodable(value):
        raise ValueError("must be valid Unicode text (it holds a lone surrogate)")
    return value


def storable_json(value: dict[str, Any]) -> dict[str, Any]:
    """Refuse JSON that ``jsonb`` rejects, wherever it is nested; name where it is.

    Iterative rather than recursive, so that the walk itself cannot overflow the stack.
    """
    stack: list[tuple[Any, tuple[str, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels at {_where(path)}")
        if isinstance(item, str):
            _check_text(item, "a string", path)
        elif isinstance(item, float) and not math.isfinite(item):
            # json.dumps spells them NaN/Infinity, which no JSON parser but Python's reads.
            raise ValueError(f"{item!r} is not a JSON number, at {_where(path)}")
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, f"the key {key!r}", path)
                stack.append((child, (*path, key)))
        elif isinstance(item, list):
            stack.extend((child, (*path, str(i))) for i, child in enumerate(item))
    return value


class _NulFreeSchema:
    """Adds the NUL-free ``pattern`` to a string's JSON schema without enforcing it there:
    ``storable_text`` enforces it with a clearer message than a regex mismatch."""

    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["pattern"] = NUL_FREE
        return schema


StorableText = Annotated[str, AfterValidator(storable_text), _NulFreeSchema()]


def json_integer(value: Any) -> Any:
    """JSON Schema's ``integer``: 5 and 5.0, but not ``false`` or ``"5"``, which pydantic's
    lax mode would also turn into ints, accepting what the document calls invalid."""
    if isinstance(value, bool | str | bytes):
        raise ValueError("must be a JSON integer")
    return value


_NulFree = Annotated[str, _NulFreeSchema()]
# A named definition, so that pydantic states the key rule as ``propertyNames`` (a plain
# ``pattern`` on keys would become ``patternProperties``, which still allows other keys).
NulFreeKey = TypeAliasType("NulFreeKey", _NulFree)

# For the OpenAPI document only: validating every nested value through this union would cost
# more and coerce values; ``storable_json`` checks the parsed ``dict`` instead.
StorableJson = TypeAliasType(
    "StorableJson",
    Annotated[
        "_NulFree | float | bool | list[StorableJson] | dict[NulFreeKey, StorableJson] | None",
        Field(
            description=(
                "Any JSON value PostgreSQL's jsonb can store: no U+0000 in strings or keys, "
                f"finite numbers only, at most {MAX_JSON_DEPTH} levels deep."
            )
        ),
    ],
)


class _StorableObjectSchema:
    def __get_pydantic_json_schema__(
        self, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return handler(TypeAdapter(dict[NulFreeKey, StorableJson]).core_schema)


StorableObject = Annotated[dict[str, Any], AfterValidator(storable_json), _StorableObjectSchema()]


def _check_text(text: str, what: str, path: tuple[str, ...]) -> None:
    if "\x00" in text:
        raise ValueError(f"{what} contains a NUL character (\\u0000) at {_where(path)}")
    if not _encodable(text):
        raise ValueError(f"{what} holds a lone surrogate at {_where(path)}")


def _encodable(text: str) -> bool:
    # The common case, ASCII, needs no encoding attempt.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _where(path: tuple[str, ...]) -> str:
    # A JSON Pointer (RFC 6901): unambiguous even when keys hold dots or brackets.
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in path) if path else "/"
