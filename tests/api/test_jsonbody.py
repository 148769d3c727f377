"""orjson bodies are the bytes Starlette's JSONResponse writes, for what the routes build."""

from __future__ import annotations

import datetime as dt
import json
import uuid
from typing import Any

import pytest
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from threadline.api.jsonbody import json_body


class Part(BaseModel):
    text: str


BODIES: list[Any] = [
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1_764_500_000,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": 'héllo "wörld" \n\t ☃ 😀 \u2028'},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        "temperature": 0.25,
        "big": 2**53 + 1,
        "flags": [True, False],
        "empty": {},
    },
    {"error": {"message": "bad </script>", "type": "invalid_request_error", "param": None}},
    {"id": uuid.UUID(int=7), "at": dt.datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC)},
    {"part": Part(text="x"), "tuple": (1, 2), 3: "non-string key"},
    [1.5, 0.001, 1_764_500_000.123456, 123456789.125, -0.0, 1e15],
]


@pytest.mark.parametrize("body", BODIES)
def test_orjson_bodies_are_the_bytes_of_fastapis_own_path(body: Any) -> None:
    expected = JSONResponse(jsonable_encoder(body))
    for encoder in ("orjson", "stdlib"):
        response = json_body(encoder, body, status_code=201, headers={"X-Session-Id": "s"})  # type: ignore[arg-type]
        assert response.body == expected.body, encoder
        assert response.status_code == 201
        assert response.headers["x-session-id"] == "s"
        assert response.headers["content-type"] == "application/json"


def test_floats_in_exponent_notation_are_the_one_difference_and_read_the_same() -> None:
    """Python writes 1e-07 and 2.5e-05 where orjson writes 1e-7 and 0.000025: the same JSON
    number. Only a float under 1e-4 (a caller's tiny ``top_p``, say) is written differently."""
    body = [1e-7, 1e16, 0.0001, 2.5e-5]
    ours = json_body("orjson", body).body
    assert ours == b"[1e-7,1e+16,0.0001,0.000025]"
    assert json.loads(ours) == json.loads(JSONResponse(body).body) == body
