"""The JSON bodies of routes that build them as dicts (the OpenAI-compatible API).

FastAPI serializes what a route returns: with pydantic's Rust serializer when the route declares
a response model (the native API: nothing to gain there), otherwise with ``jsonable_encoder``, a
recursive walk in Python, then ``json.dumps``. For a chat completion that is ~145 us against
~2 us for orjson (one process, loaded machine: ratios only). A route that returns a
``Response`` skips both, so these routes return ``json_body(...)``.

The bytes are those of Starlette's ``JSONResponse`` (compact separators, UTF-8 left unescaped):
orjson writes the same for the str/int/float/bool/None/list/dict bodies built here, and what it
cannot write itself (a pydantic model, say) goes through ``jsonable_encoder`` first, as before.
One difference: a float under 1e-4 is written in another, equal, spelling (``1e-07`` becomes
``1e-7``, ``2.5e-05`` becomes ``0.000025``); tests/api/test_jsonbody.py pins both.
``THREADLINE_JSON_ENCODER=stdlib`` restores FastAPI's own path, for A/B measurements.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from threadline.config import JsonEncoder


class ORJSONBody(JSONResponse):
    def render(self, content: Any) -> bytes:
        # Non-string keys become strings, as json.dumps makes them.
        return orjson.dumps(content, default=jsonable_encoder, option=orjson.OPT_NON_STR_KEYS)


def json_body(
    encoder: JsonEncoder,
    content: Any,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """``content`` as the response, encoded by ``encoder``."""
    if encoder == "orjson":
        return ORJSONBody(content, status_code=status_code, headers=headers)
    return JSONResponse(jsonable_encoder(content), status_code=status_code, headers=headers)
