"""The emulator's Responses API, driven by the official `openai` SDK over real sockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse

from emulator import AzureEmulator, Fault
from gateway.upstream.httpclient import KeepAliveHTTPClient

from .conftest import DEPLOYMENT, EMULATOR_KEY

PREVIEW = "2025-04-01-preview"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}


def v1_client(emulator: AzureEmulator, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=emulator.url + "/openai/v1/", api_key=EMULATOR_KEY, max_retries=0, **options
    )


def dated_client(emulator: AzureEmulator, version: str = PREVIEW) -> openai.AsyncAzureOpenAI:
    return openai.AsyncAzureOpenAI(
        azure_endpoint=emulator.url, api_key=EMULATOR_KEY, api_version=version, max_retries=0
    )


@pytest.fixture
def http(io_loop: Any) -> Any:
    client = AsyncHTTPClient(force_instance=True)
    yield client
    client.close()


@pytest.fixture
def keep_alive(io_loop: Any) -> Any:
    """Our keep-alive client: it reports a reset as an error (Tornado's simple client logs it)."""
    client = KeepAliveHTTPClient(force_instance=True)
    yield client
    client.close()


async def raw(
    http: AsyncHTTPClient,
    emulator: AzureEmulator,
    method: str,
    path: str,
    body: Any = None,
    **headers: str,
) -> HTTPResponse:
    return await http.fetch(
        emulator.url + path,
        method=method,
        body=None if body is None else json.dumps(body),
        headers={"api-key": EMULATOR_KEY, "Content-Type": "application/json", **headers},
        raise_error=False,
        allow_nonstandard_methods=True,
    )


def sse(body: bytes) -> list[dict]:
    """Split a Responses stream into events, checking each `event:` line names its data's type."""
    assert body.endswith(b"\n\n")
    events = []
    for frame in body.decode().split("\n\n")[:-1]:
        event_line, data_line = frame.split("\n")
        event = json.loads(data_line.removeprefix("data: "))
        assert event_line == f"event: {event['type']}"
        events.append(event)
    return events


# --- create ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_create_answers_the_echo_with_word_usage(emulator):
    async with v1_client(emulator) as client:
        response = await client.responses.create(
            model=DEPLOYMENT, input="hello there", instructions="Be brief."
        )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status == "completed" and response.error is None
    assert response.model == emulator.model
    assert response.output_text == "You said: hello there"
    [message] = response.output
    assert (
        message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    )
    assert message.content[0].text == "You said: hello there"
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (4, 4, 8)
    assert response.store is True and response.instructions == "Be brief."

    record = emulator.requests[-1]
    assert (record.method, record.path, record.query) == ("POST", "/openai/v1/responses", {})
    assert (record.operation, record.deployment) == ("responses.create", DEPLOYMENT)
    assert record.headers["authorization"] == f"Bearer {EMULATOR_KEY}"
    assert (
        json.loads(record.response_body)["output_text"] == "You said: hello there"
    )  # Azure sends it on the wire


@pytest.mark.gen_test
async def test_stream_events_follow_the_protocol_order(emulator, http):
    response = await raw(
        http,
        emulator,
        "POST",
        "/openai/v1/responses",
        {"model": DEPLOYMENT, "input": "stream this", "stream": True},
    )
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert b"[DONE]" not in response.body
    events = sse(response.body)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    deltas = [event["delta"] for event in events if event["type"] == "response.output_text.delta"]
    assert deltas == ["You", " said:", " stream", " this"]
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 4,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    created, completed = events[0]["response"], events[-1]["response"]
    assert (
        created["status"] == "in_progress" and created["output"] == [] and created["usage"] is None
    )
    assert completed["id"] == created["id"] and completed["status"] == "completed"
    assert completed["usage"]["input_tokens"] == 2 and completed["usage"]["output_tokens"] == 4
    item_id = events[2]["item"]["id"]
    assert all(event["item_id"] == item_id for event in events[3:-2])
    assert events[-4]["text"] == "You said: stream this"


@pytest.mark.gen_test
async def test_sdk_stream_and_stream_helper_assemble_the_text(emulator):
    async with v1_client(emulator) as client:
        stream = await client.responses.create(model=DEPLOYMENT, input="one two three", stream=True)
        events = [event async for event in stream]
        async with client.responses.stream(model=DEPLOYMENT, input="helper text") as helper:
            helper_deltas = [
                event.delta async for event in helper if event.type == "response.output_text.delta"
            ]
            final = await helper.get_final_response()
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == "You said: one two three" == events[-1].response.output_text
    assert "".join(helper_deltas) == final.output_text == "You said: helper text"
    assert final.usage.output_tokens == 4
    assert final.id in emulator.stored_responses


@pytest.mark.gen_test
async def test_max_output_tokens_cuts_the_answer_as_incomplete(emulator):
    text = " ".join(f"w{index}" for index in range(20))
    async with v1_client(emulator) as client:
        response = await client.responses.create(model=DEPLOYMENT, input=text, max_output_tokens=16)
    assert (
        response.status == "incomplete"
        and response.incomplete_details.reason == "max_output_tokens"
    )
    assert response.usage.output_tokens == 16
    assert response.output_text == "You said: " + " ".join(f"w{index}" for index in range(14))


# --- stored responses -------------------------------------------------------------


@pytest.mark.gen_test
async def test_retrieve_input_items_and_delete(emulator, http):
    conversation = [
        {"role": "developer", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"role": "assistant", "content": "earlier answer"},
        {"role": "user", "content": "second question"},
    ]
    async with v1_client(emulator) as client:
        created = await client.responses.create(model=DEPLOYMENT, input=conversation)
        assert created.output_text == "You said: second question"
        retrieved = await client.responses.retrieve(created.id)
        assert retrieved.model_dump() == created.model_dump()
        assert emulator.requests[-1].operation == "responses.retrieve"
        assert emulator.requests[-1].deployment == DEPLOYMENT

        items = [
            item
            async for item in client.responses.input_items.list(created.id, limit=3, order="asc")
        ]
        assert len(emulator.requests) == 4  # two pages of at most three
        assert [item.role for item in items] == ["developer", "user", "assistant", "user"]
        assert all(item.id for item in items) and len({item.id for item in items}) == 4
        assert items[1].content[0].text == "first" and items[3].content[0].type == "input_text"
        assert items[2].content[0].type == "output_text"
        newest = await client.responses.input_items.list(created.id, limit=1)
        assert [item.id for item in newest.data] == [items[3].id] and newest.has_more

        await client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.responses.retrieve(created.id)
    assert missing.value.body["message"] == f"Response with id '{created.id}' not found."

    again = await raw(
        http, emulator, "POST", "/openai/v1/responses", {"model": DEPLOYMENT, "input": "x"}
    )
    response_id = json.loads(again.body)["id"]
    deleted = await raw(http, emulator, "DELETE", f"/openai/v1/responses/{response_id}")
    assert json.loads(deleted.body) == {
        "object": "response.deleted",
        "id": response_id,
        "deleted": True,
    }
    assert (await raw(http, emulator, "DELETE", f"/openai/v1/responses/{response_id}")).code == 404


@pytest.mark.gen_test
async def test_previous_response_id_is_known_only_to_the_instance_that_made_it(emulator, io_loop):
    other = AzureEmulator(key=EMULATOR_KEY, deployments=(DEPLOYMENT,))
    await other.start()
    try:
        async with v1_client(emulator) as client, v1_client(other) as elsewhere:
            first = await client.responses.create(model=DEPLOYMENT, input="one two")
            follow_up = await client.responses.create(
                model=DEPLOYMENT, input="three", previous_response_id=first.id
            )
            # The follow-up reads the whole conversation: 2 + 4 tokens before, 1 now.
            assert follow_up.usage.input_tokens == 7 and follow_up.previous_response_id == first.id
            with pytest.raises(openai.BadRequestError) as refused:
                await elsewhere.responses.create(
                    model=DEPLOYMENT, input="three", previous_response_id=first.id
                )
            with pytest.raises(openai.NotFoundError):
                await elsewhere.responses.retrieve(first.id)
    finally:
        await other.stop()
    assert refused.value.status_code == 400
    assert refused.value.body == {
        "message": f"Previous response with id '{first.id}' not found.",
        "type": "invalid_request_error",
        "param": "previous_response_id",
        "code": "previous_response_not_found",
    }


@pytest.mark.gen_test
async def test_store_false_responses_are_not_kept(emulator):
    async with v1_client(emulator) as client:
        unstored = await client.responses.create(model=DEPLOYMENT, input="forget me", store=False)
        assert unstored.store is False and unstored.output_text == "You said: forget me"
        streamed = await client.responses.create(
            model=DEPLOYMENT, input="me too", store=False, stream=True
        )
        streamed_id = [event async for event in streamed][0].response.id
        for response_id in (unstored.id, streamed_id):
            with pytest.raises(openai.NotFoundError):
                await client.responses.retrieve(response_id)
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.create(
                model=DEPLOYMENT, input="x", previous_response_id=unstored.id
            )
    assert refused.value.code == "previous_response_not_found"


@pytest.mark.gen_test
async def test_background_responses_run_and_can_be_cancelled(emulator):
    async with v1_client(emulator) as client:
        queued = await client.responses.create(model=DEPLOYMENT, input="later", background=True)
        assert queued.status == "queued" and queued.output == [] and queued.background is True
        await asyncio.wait_for(emulator.stored_responses.get(queued.id).settled.wait(), 5)
        done = await client.responses.retrieve(queued.id)
        assert done.status == "completed" and done.output_text == "You said: later"
        assert (
            await client.responses.cancel(queued.id)
        ).status == "completed"  # cancelling a finished one: idempotent

        emulator.add_fault(Fault(hang=True))  # a run that never ends by itself
        running = await client.responses.create(model=DEPLOYMENT, input="forever", background=True)
        assert (await client.responses.retrieve(running.id)).status == "in_progress"
        cancelled = await client.responses.cancel(running.id)
        assert cancelled.status == "cancelled" and cancelled.id == running.id
        assert (await client.responses.cancel(running.id)).status == "cancelled"
        assert emulator.stored_responses.get(running.id).run.cancelled()

        synchronous = await client.responses.create(model=DEPLOYMENT, input="now")
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.cancel(synchronous.id)
        with pytest.raises(openai.BadRequestError, match="store"):
            await client.responses.create(model=DEPLOYMENT, input="x", background=True, store=False)
    assert refused.value.body["message"] == "Cannot cancel a synchronous response."
    assert emulator.requests[-2].operation == "responses.cancel"


@pytest.mark.gen_test
async def test_stop_ends_a_background_run(io_loop):
    emu = AzureEmulator(key=EMULATOR_KEY, deployments=(DEPLOYMENT,))
    await emu.start()
    emu.add_fault(Fault(hang=True))
    async with v1_client(emu) as client:
        running = await client.responses.create(model=DEPLOYMENT, input="x", background=True)
    await asyncio.wait_for(emu.stop(), 5)
    assert emu.stored_responses.get(running.id).run.cancelled()


# --- tools and structured output ---------------------------------------------------


class Weather(BaseModel):
    city: str
    unit: str
    days: int


@pytest.mark.gen_test
async def test_auto_tool_call_then_the_answer_after_its_result(emulator):
    async with v1_client(emulator) as client:
        call = await client.responses.create(
            model=DEPLOYMENT, input="weather in Paris", tools=[WEATHER]
        )
        [item] = call.output
        assert (
            item.type == "function_call"
            and item.name == "get_weather"
            and item.call_id.startswith("call_")
        )
        arguments = json.loads(item.arguments)
        jsonschema.validate(arguments, WEATHER["parameters"])
        assert arguments == {"city": "weather in Paris", "unit": "c"}
        assert call.output_text == "" and call.usage.output_tokens == len(item.arguments.split())

        result = {"type": "function_call_output", "call_id": item.call_id, "output": "sunny"}
        answer = await client.responses.create(
            model=DEPLOYMENT, input=[result], tools=[WEATHER], previous_response_id=call.id
        )
        assert answer.output_text == "You said: sunny" and answer.output[0].type == "message"
        none = await client.responses.create(
            model=DEPLOYMENT, input="x", tools=[WEATHER], tool_choice="none"
        )
        assert none.output_text == "You said: x"

        async with client.responses.stream(
            model=DEPLOYMENT,
            input="Rome",
            tools=[WEATHER],
            tool_choice={"type": "function", "name": "get_weather"},
        ) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
    assert (
        "response.function_call_arguments.delta" in kinds
        and "response.function_call_arguments.done" in kinds
    )
    assert json.loads(final.output[0].arguments) == {"city": "Rome", "unit": "c"}


@pytest.mark.gen_test
async def test_parse_with_a_text_format_model(emulator):
    async with v1_client(emulator) as client:
        parsed = await client.responses.parse(model=DEPLOYMENT, input="Oslo", text_format=Weather)
        async with client.responses.stream(
            model=DEPLOYMENT, input="Bergen", text_format=Weather
        ) as stream:
            streamed = await stream.get_final_response()
    assert parsed.output_parsed == Weather(city="Oslo", unit="Oslo", days=0)
    assert streamed.output_parsed == Weather(city="Bergen", unit="Bergen", days=0)


# --- URL families, versions, credentials and refusals ---------------------------------


@pytest.mark.gen_test
async def test_dated_responses_paths_take_preview_versions(emulator, http):
    async with dated_client(emulator) as client:
        created = await client.responses.create(model=DEPLOYMENT, input="dated")
        assert (await client.responses.retrieve(created.id)).output_text == "You said: dated"
        assert [
            item.content[0].text async for item in client.responses.input_items.list(created.id)
        ] == ["dated"]
        await client.responses.delete(created.id)
    paths = [
        (record.method, record.path, record.query.get("api-version"))
        for record in emulator.requests
    ]
    assert paths == [
        ("POST", "/openai/responses", PREVIEW),
        ("GET", f"/openai/responses/{created.id}", PREVIEW),
        ("GET", f"/openai/responses/{created.id}/input_items", PREVIEW),
        ("DELETE", f"/openai/responses/{created.id}", PREVIEW),
    ]
    body = {"model": DEPLOYMENT, "input": "x"}
    for query in ("", "?api-version=2024-10-21", "?api-version=2025-01-01-preview"):
        response = await raw(http, emulator, "POST", "/openai/responses" + query, body)
        assert response.code == 404 and json.loads(response.body)["error"]["code"] == "404"
    for query in ("?api-version=v1", "?api-version=preview"):
        assert (await raw(http, emulator, "POST", "/openai/v1/responses" + query, body)).code == 200
    assert (
        await raw(
            http, emulator, "POST", "/openai/v1/responses?api-version=2025-04-01-preview", body
        )
    ).code == 404


@pytest.mark.gen_test
async def test_credentials(emulator, http):
    body = {"model": DEPLOYMENT, "input": "x"}
    bearer = {"api-key": "", "Authorization": f"Bearer {EMULATOR_KEY}"}
    assert (await raw(http, emulator, "POST", "/openai/v1/responses", body, **bearer)).code == 200
    dated = await raw(
        http, emulator, "POST", f"/openai/responses?api-version={PREVIEW}", body, **bearer
    )
    assert dated.code == 401 and json.loads(dated.body)["error"]["code"] == "401"
    wrong = await raw(http, emulator, "GET", "/openai/v1/responses/resp_x", **{"api-key": "wrong"})
    assert wrong.code == 401


@pytest.mark.gen_test
async def test_refusals_name_the_field(emulator, http):
    async def create(body: Any) -> tuple[int, dict]:
        response = await raw(http, emulator, "POST", "/openai/v1/responses", body)
        return response.code, json.loads(response.body)["error"]

    code, error = await create({"input": "x"})
    assert (code, error["param"], error["code"]) == (400, "model", "missing_required_parameter")
    code, error = await create({"model": "nope", "input": "x"})
    assert (code, error["code"]) == (404, "DeploymentNotFound")
    assert emulator.requests[-1].deployment == "nope"
    code, error = await create(
        {
            "model": DEPLOYMENT,
            "input": "x",
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    )
    assert (code, error["code"], error["param"]) == (
        400,
        "unknown_parameter",
        "stream_options.include_usage",
    )
    assert error["message"] == "Unknown parameter: 'stream_options.include_usage'."
    code, error = await create({"model": DEPLOYMENT, "input": "x", "max_output_tokens": 5})
    assert (code, error["param"]) == (400, "max_output_tokens")
    code, error = await create({"model": DEPLOYMENT, "input": 5})
    assert (code, error["param"]) == (400, "input")
    response = await raw(
        http, emulator, "GET", "/openai/v1/responses/resp_missing/input_items?limit=0"
    )
    assert response.code == 404
    created = json.loads(
        (
            await raw(
                http, emulator, "POST", "/openai/v1/responses", {"model": DEPLOYMENT, "input": "x"}
            )
        ).body
    )
    for query, param in (("limit=0", "limit"), ("order=up", "order"), ("after=msg_nope", "after")):
        response = await raw(
            http, emulator, "GET", f"/openai/v1/responses/{created['id']}/input_items?{query}"
        )
        assert response.code == 400 and json.loads(response.body)["error"]["param"] == param


# --- faults ------------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_faults_apply_to_every_responses_operation(emulator, http):
    async with v1_client(emulator) as client:
        created = await client.responses.create(model=DEPLOYMENT, input="x")
        emulator.add_fault(Fault(kind="rate_limit"))
        emulator.add_fault(Fault(kind="server_error", times=3))
        with pytest.raises(openai.RateLimitError) as limited:
            await client.responses.create(model=DEPLOYMENT, input="x")
        assert limited.value.response.headers["retry-after-ms"] == "1000"
        for call in (
            client.responses.retrieve(created.id),
            client.responses.input_items.list(created.id),
            client.responses.delete(created.id),
        ):
            with pytest.raises(openai.InternalServerError):
                await call
        assert created.id in emulator.stored_responses  # the failed delete deleted nothing
        emulator.add_fault(Fault(headers={"x-ratelimit-remaining-tokens": "-1"}))
        answered = await client.responses.with_raw_response.retrieve(created.id)
        assert answered.headers["x-ratelimit-remaining-tokens"] == "-1"


@pytest.mark.gen_test
async def test_a_stream_reset_mid_way_leaves_a_failed_response(emulator, keep_alive):
    emulator.add_fault(Fault(reset_after=3))
    received: list[bytes] = []
    with pytest.raises(HTTPClientError, match="reset"):
        await keep_alive.fetch(
            emulator.url + "/openai/v1/responses",
            method="POST",
            streaming_callback=received.append,
            body=json.dumps({"model": DEPLOYMENT, "input": "cut me", "stream": True}),
            headers={"api-key": EMULATOR_KEY},
        )
    events = sse(b"".join(received))
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
    ]
    stored = emulator.stored_responses.get(events[0]["response"]["id"])
    await asyncio.wait_for(stored.settled.wait(), 5)
    assert (
        stored.response["status"] == "failed" and stored.response["error"]["code"] == "server_error"
    )

    emulator.add_fault(Fault(chunk_gap=30))
    first = asyncio.Event()
    request = asyncio.ensure_future(
        keep_alive.fetch(
            emulator.url + "/openai/v1/responses",
            method="POST",
            streaming_callback=lambda chunk: first.set(),
            body=json.dumps({"model": DEPLOYMENT, "input": "slow", "stream": True}),
            headers={"api-key": EMULATOR_KEY},
            request_timeout=0.5,
        )
    )
    await asyncio.wait_for(first.wait(), 5)
    with pytest.raises(HTTPClientError):
        await request
    stored = emulator.stored_responses.get(
        sse(emulator.requests[-1].response_body)[0]["response"]["id"]
    )
    await asyncio.wait_for(stored.settled.wait(), 5)
    assert stored.response["status"] == "cancelled"


@pytest.mark.gen_test
async def test_a_background_stream_is_streamed(emulator):
    async with v1_client(emulator) as client:
        stream = await client.responses.create(
            model=DEPLOYMENT, input="bg", background=True, stream=True
        )
        events = [event async for event in stream]
        assert events[-1].type == "response.completed" and events[-1].response.background is True
        cancelled = await client.responses.cancel(events[-1].response.id)
    assert cancelled.status == "completed"  # it had finished: cancelling returns the final response
