"""``/v1/responses`` driven by the official ``openai`` SDK (sync, async, streaming) against a
real ``threadline serve`` process on PostgreSQL and Redis, with the agents of ``agents.py``.

Waits for the server's state poll it (``GET /v1/responses/{id}``); the burst agent makes "one
model call per burst" independent of timing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.conftest import service_url
from tests.openai_api.agents import AGENT_INSTRUCTIONS, WAITING
from tests.serving import serving

POLL_S = 0.02


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A ``threadline serve`` process with the built-in agents and those of ``agents.py``."""
    log = tmp_path_factory.mktemp("responses") / "server.log"
    with serving(
        log,
        THREADLINE_DATABASE_URL=service_url("THREADLINE_TEST_DATABASE_URL"),
        THREADLINE_REDIS_URL=service_url("THREADLINE_TEST_REDIS_URL"),
        THREADLINE_AGENTS_MODULE="tests.openai_api.agents",
        THREADLINE_POOL_MAX_SIZE="5",
        THREADLINE_SHUTDOWN_GRACE_S="1",
    ) as url:
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture
def client(server_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as opened:
        yield opened


@pytest.fixture
async def aclient(server_url: str) -> Any:
    async with AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0) as c:
        yield c


def poll(client: OpenAI, response_id: str, until: Callable[[Any], bool]) -> Any:
    """Retrieve a response until ``until`` holds; the test's timeout bounds the wait."""
    while not until(found := client.responses.retrieve(response_id)):
        time.sleep(POLL_S)  # the state is another process's
    return found


def message_id(response_id: str) -> str:
    return str(uuid.UUID(hex=response_id.removeprefix("resp_")))


def tag() -> str:
    return uuid.uuid4().hex[:12]


# -- blocking, sync client ------------------------------------------------------------------


def test_a_string_input_is_answered_with_a_completed_response(client: OpenAI) -> None:
    response = client.responses.create(model="echo", input="hello there")

    assert response.status == "completed"
    assert response.output_text == "echo: hello there"
    assert response.id == f"resp_{uuid.UUID(response.metadata['message_id']).hex}"
    assert response.model == "echo"
    assert response.error is None
    [item] = response.output
    assert item.type == "message"
    assert item.status == "completed"
    assert item.id == f"msg_{uuid.UUID(response.metadata['run_id']).hex}"
    assert response.usage is not None
    assert response.usage.output_tokens > 0
    total = response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.total_tokens == total
    assert response.metadata["message_ids"] == response.metadata["message_id"]
    # Retrieved later, the same reply and run.
    again = client.responses.retrieve(response.id)
    assert again.status == "completed"
    assert again.output_text == "echo: hello there"
    assert again.metadata["run_id"] == response.metadata["run_id"]


def test_previous_response_id_continues_its_session(client: OpenAI, server_url: str) -> None:
    first = client.responses.create(model="echo", input="first")
    second = client.responses.create(model="echo", input="second", previous_response_id=first.id)

    assert second.previous_response_id == first.id
    session_id = first.metadata["session_id"]
    assert second.metadata["session_id"] == session_id
    history = httpx.get(f"{server_url}/api/v1/sessions/{session_id}").json()["messages"]
    assert [m["content"] for m in history] == ["first", "echo: first", "second", "echo: second"]


def test_instructions_are_appended_to_the_agents_for_that_response(client: OpenAI) -> None:
    told = client.responses.create(model="instructed", input="hi", instructions="Answer in French.")
    plain = client.responses.create(model="instructed", input="again", previous_response_id=told.id)

    assert told.output_text == (
        f"instructions: {AGENT_INSTRUCTIONS}\n\nAnswer in French. | echo: hi"
    )
    assert told.instructions == "Answer in French."
    assert client.responses.retrieve(told.id).instructions == "Answer in French."
    # Not carried over to the next response, as OpenAI's are not.
    assert plain.output_text == f"instructions: {AGENT_INSTRUCTIONS} | echo: again"
    assert plain.instructions is None


def test_a_merged_run_takes_the_newest_messages_instructions(client: OpenAI) -> None:
    burst, conversation = tag(), f"conv-{tag()}"
    first = client.responses.create(
        model="instructed",
        input=f"part 1/2 of {burst}",
        conversation=conversation,
        instructions="First.",
        background=True,
    )
    poll(client, first.id, lambda r: r.status == "in_progress")
    second = client.responses.create(
        model="instructed",
        input=f"part 2/2 of {burst}",
        conversation=conversation,
        instructions="Second.",
    )

    prompt = f"part 1/2 of {burst}\n---\npart 2/2 of {burst}"
    assert second.output_text == f"instructions: {AGENT_INSTRUCTIONS}\n\nSecond. | echo: {prompt}"
    merged = poll(client, first.id, lambda r: r.status == "completed")
    assert merged.output_text == second.output_text
    assert merged.instructions == "First."  # what its request asked, though another's applied
    assert merged.metadata["merged"] == "true"


def test_unsupported_fields_are_refused_naming_them(client: OpenAI) -> None:
    refusals: list[tuple[dict[str, Any], str]] = [
        ({"temperature": 0.2}, "temperature"),
        ({"max_output_tokens": 50}, "max_output_tokens"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"store": False}, "store"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"text": {"format": {"type": "json_object"}}}, "text.format"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]},
         "input[0].type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
         "input[0].content[0].type"),
    ]  # fmt: skip
    for extra, param in refusals:
        body: dict[str, Any] = {"model": "echo", "input": "hi", **extra}
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**body)
        assert refused.value.param == param, extra
        assert refused.value.code == "unsupported_parameter", extra
        assert param in refused.value.message, extra


def test_unknown_names_are_404_in_openais_shape(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as unknown_model:
        client.responses.create(model="no-such-agent", input="hi")
    assert unknown_model.value.code == "agent_not_found"
    assert unknown_model.value.type == "not_found_error"

    with pytest.raises(openai.NotFoundError) as unknown_previous:
        client.responses.create(
            model="echo", input="hi", previous_response_id=f"resp_{uuid.uuid4().hex}"
        )
    assert unknown_previous.value.code == "response_not_found"

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_nonsense")

    with pytest.raises(openai.BadRequestError) as both:
        client.responses.create(
            model="echo", input="hi", conversation="c", previous_response_id="resp_x"
        )
    assert both.value.code == "invalid_input"


# -- background, retrieve, cancel -------------------------------------------------------------


def test_a_background_response_is_polled_to_completion(client: OpenAI) -> None:
    queued = client.responses.create(model="echo", input="later", background=True)

    assert queued.status == "queued"
    assert queued.background is True
    done = poll(client, queued.id, lambda r: r.status not in ("queued", "in_progress"))
    assert done.status == "completed"
    assert done.output_text == "echo: later"


def test_a_background_response_in_flight_is_cancelled(client: OpenAI) -> None:
    # A lone part of a burst: its run waits for the rest, which never comes.
    queued = client.responses.create(model="burst", input=f"part 1/2 of {tag()}", background=True)
    running = poll(client, queued.id, lambda r: r.status == "in_progress")
    assert running.metadata["run_id"]

    cancelled = client.responses.cancel(queued.id)

    assert cancelled.status == "cancelled"
    assert cancelled.output == []
    assert cancelled.metadata["run_id"] == running.metadata["run_id"]
    assert client.responses.retrieve(queued.id).status == "cancelled"
    assert client.responses.cancel(queued.id).status == "cancelled"  # idempotent
    # One that completed cannot be cancelled.
    done = client.responses.create(model="echo", input="quick")
    with pytest.raises(openai.ConflictError) as ended:
        client.responses.cancel(done.id)
    assert ended.value.code == "run_not_active"


# -- streaming ----------------------------------------------------------------------------


def test_a_stream_is_openais_event_sequence(client: OpenAI) -> None:
    with client.responses.stream(model="echo", input="stream me please") as stream:
        events = list(stream)
        final = stream.get_final_response()

    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == "echo: stream me please"
    assert final.status == "completed"
    assert final.output_text == "echo: stream me please"
    assert final.id == events[0].response.id


async def test_an_async_stream_with_create(aclient: AsyncOpenAI) -> None:
    stream = await aclient.responses.create(model="echo", input="async stream", stream=True)
    events = [event async for event in stream]

    assert events[0].type == "response.created"
    assert events[0].response.status == "queued"
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: async stream"
    assert events[-1].response.usage is not None


async def test_a_superseded_run_ends_its_item_and_the_merged_run_opens_the_next(
    aclient: AsyncOpenAI,
) -> None:
    burst, conversation = tag(), f"conv-{tag()}"
    seen: asyncio.Queue[Any] = asyncio.Queue()

    async def follow() -> Any:
        async with aclient.responses.stream(
            model="burst", input=f"part 1/2 of {burst}", conversation=conversation
        ) as stream:
            async for event in stream:
                seen.put_nowait(event)
            return await stream.get_final_response()

    streaming = asyncio.create_task(follow())
    while (await seen.get()).type != "response.output_text.delta":
        pass  # the first run is streaming
    second = await aclient.responses.create(
        model="burst", input=f"part 2/2 of {burst}", conversation={"id": conversation}
    )
    final = await streaming

    events = []
    while not seen.empty():
        events.append(seen.get_nowait())
    ended = [e.item for e in events if e.type == "response.output_item.done"]
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [item.status for item in ended] == ["incomplete", "completed"]
    assert ended[0].content[0].text == WAITING
    assert [e.output_index for e in added] == [1]  # the first was taken before
    merged = f"echo: part 1/2 of {burst}\n---\npart 2/2 of {burst}"
    assert final.output_text == merged
    assert [item.id for item in final.output] == [ended[1].id]
    assert second.output_text == merged
    assert final.metadata["run_id"] == second.metadata["run_id"]
    assert final.conversation is not None
    assert final.conversation.id == conversation


async def test_a_streamed_response_cancelled_by_a_client_ends_with_response_failed(
    aclient: AsyncOpenAI,
) -> None:
    stream = await aclient.responses.create(
        model="burst", input=f"part 1/2 of {tag()}", stream=True
    )
    events = []
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta":
            cancelled = await aclient.responses.cancel(events[0].response.id)
            assert cancelled.status == "cancelled"

    kinds = [e.type for e in events]
    assert kinds[-2:] == ["response.output_item.done", "response.failed"]
    assert events[-2].item.status == "incomplete"
    assert events[-1].response.status == "cancelled"
    assert events[-1].response.output == []


# -- conversations and bursts, async client -----------------------------------------------


async def test_a_conversation_is_created_on_demand_and_continued(aclient: AsyncOpenAI) -> None:
    name = f"conv-{tag()}"
    # A new conversation takes the history the client brought.
    first = await aclient.responses.create(
        model="echo",
        conversation=name,
        input=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "before"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "answered"}]},
            {"role": "user", "content": [{"type": "input_text", "text": "now"}]},
        ],
    )
    second = await aclient.responses.create(model="echo", input="next", conversation={"id": name})

    assert first.output_text == "echo: now"
    assert first.instructions == "Be brief."
    assert first.conversation is not None
    assert first.conversation.id == name
    assert second.metadata["session_id"] == first.metadata["session_id"]
    async with httpx.AsyncClient(base_url=str(aclient.base_url).removesuffix("/v1/")) as http:
        session = (await http.get(f"/api/v1/sessions/{first.metadata['session_id']}")).json()
    assert [m["content"] for m in session["messages"]] == [
        "before", "answered", "now", "echo: now", "next", "echo: next"
    ]  # fmt: skip


async def test_a_burst_of_three_is_answered_by_one_model_call(
    aclient: AsyncOpenAI, server_url: str
) -> None:
    burst, conversation = tag(), f"burst-{tag()}"
    responses = await asyncio.gather(
        *(
            aclient.responses.create(
                model="burst", input=f"part {i}/3 of {burst}", conversation=conversation
            )
            for i in (1, 2, 3)
        )
    )

    texts = {r.output_text for r in responses}
    assert len(texts) == 1, texts
    parts = texts.pop().removeprefix("echo: ").split("\n---\n")
    assert sorted(parts) == [f"part {i}/3 of {burst}" for i in (1, 2, 3)]
    assert len({r.metadata["run_id"] for r in responses}) == 1
    ids = {message_id(r.id) for r in responses}
    async with httpx.AsyncClient(base_url=server_url) as http:
        runs = (await http.get(f"/api/v1/sessions/{conversation}/runs")).json()["runs"]
    succeeded = [run for run in runs if run["status"] == "succeeded"]
    assert len(succeeded) == 1, runs
    assert set(succeeded[0]["message_ids"]) == ids
    assert all(run["status"] == "superseded" for run in runs if run not in succeeded), runs
