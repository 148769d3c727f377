"""An Anthropic client that validates the messages and stream events it receives
(``validation.py``): a ``BetaMessage`` ~87 µs constructed against ~13 µs validated, a stream
event (a discriminated union) ~14 against ~7 µs. Its own module, imported only when an agent
runs on Anthropic: importing the SDK's types takes over a second."""

from __future__ import annotations

from functools import cache
from typing import Any

import pydantic
from anthropic import AsyncAnthropic
from anthropic.types.beta import BetaMessage, BetaRawMessageStreamEvent

from threadline.agents.urls import PreparedUrls
from threadline.agents.validation import ValidatingClient, Validator, model_validators


@cache
def _validators() -> tuple[Validator, ...]:
    """Built on first use: the stream event union's validator takes a while to build."""
    events = pydantic.TypeAdapter[Any](BetaRawMessageStreamEvent)
    return (*model_validators(BetaMessage), (BetaRawMessageStreamEvent, events.validate_python))


class ValidatingAnthropic(PreparedUrls, ValidatingClient, AsyncAnthropic):
    """``AsyncAnthropic`` that validates the messages and stream events it receives."""

    def response_validators(self) -> tuple[Validator, ...]:
        return _validators()
