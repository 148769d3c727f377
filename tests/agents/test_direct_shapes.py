"""Which runs the direct path serves alone (``runner.py``), without I/O: a history the agent
graph would send as it is, and a reply the graph would end the run on. Anything else takes
the graph (tests/agents/test_direct.py compares both paths through the real server)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryFeedbackPart,
    RetryInfo,
    TextPart,
    ThinkingPart,
    ToolCallPart,
    UserPromptPart,
)

from threadline.runner import _direct_answer, _plain_history

_UNKNOWN_TOOL = [ToolCallPart("no_such_tool", {}, tool_call_id="c1")]


def _request(text: str) -> ModelRequest:
    return ModelRequest(parts=[UserPromptPart(text)])


def _reply(*parts: Any) -> ModelResponse:
    return ModelResponse(parts=list(parts))


@pytest.mark.parametrize(
    ("history", "plain"),
    [
        ([], True),
        ([_request("a"), _reply(TextPart("b"))], True),
        ([_request("a"), _reply(TextPart("b")), _request("c"), _reply(TextPart("d"))], True),
        ([_request("a")], False),  # a prompt never answered, then ours: two in a row
        ([_request("a"), _request("b"), _reply(TextPart("c"))], False),
        ([_request("a"), _reply(_UNKNOWN_TOOL[0]), _reply(TextPart("c"))], False),
        ([_request("a"), _reply(TextPart("b"), ThinkingPart("hm"))], False),
        (
            [
                _request("a"),
                _reply(TextPart("b")),
                ModelRequest(parts=[RetryFeedbackPart("again", retry=RetryInfo("no_output"))]),
                _reply(TextPart("c")),
            ],
            False,
        ),
    ],
)
def test_only_a_history_the_graph_sends_as_it_is_takes_the_direct_path(
    history: list[ModelMessage], plain: bool
) -> None:
    """Anything else the graph repairs or merges before sending it (pydantic-ai's
    ``repair_messages``), which the direct request does not: such a run takes the graph."""
    assert _plain_history(history) is plain


@pytest.mark.parametrize(
    ("response", "ends"),
    [
        (_reply(ThinkingPart("hm"), TextPart("a"), TextPart("b")), "ab"),
        (_reply(TextPart("a"), _UNKNOWN_TOOL[0]), None),
        (_reply(ThinkingPart("hm")), None),
        (ModelResponse(parts=[TextPart("partial")], state="suspended"), None),
    ],
)
def test_only_a_complete_text_reply_ends_a_run_at_its_direct_request(
    response: ModelResponse, ends: str | None
) -> None:
    answered = _direct_answer(response)
    assert (answered[0] if answered is not None else None) == ends
