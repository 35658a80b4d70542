"""The official `openai` SDK as a real client of the OpenAI- and Azure-shaped routes."""

from __future__ import annotations

import json

import openai
import pytest

from emulator import Fault

from .conftest import API_VERSION, DEPLOYMENT, EMULATOR_KEY
from .support.sdk_clients import CALLER_KEY, CLIENTS, openai_client

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@CLIENTS
@pytest.mark.gen_test
async def test_non_stream_and_the_upstream_request(gateway, make_client):
    async with make_client(gateway) as client:
        completion = await client.chat.completions.create(
            model=DEPLOYMENT,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hello sdk"},
            ],
            temperature=0.5,
            seed=7,
            logit_bias={"50256": -100},
        )
    assert completion.choices[0].message.content == "You said: hello sdk"
    assert completion.usage.total_tokens > 0
    assert "success" not in (completion.model_extra or {})
    received = gateway.emulator.requests[-1]
    assert received.headers["api-key"] == EMULATOR_KEY
    assert CALLER_KEY not in json.dumps(received.headers)
    assert received.json == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello sdk"},
        ],
        "model": DEPLOYMENT,
        "temperature": 0.5,
        "seed": 7,
        "logit_bias": {"50256": -100},
    }


@CLIENTS
@pytest.mark.gen_test
async def test_stream_assembles_the_same_text_and_keeps_azure_events(gateway, make_client):
    async with make_client(gateway) as client:
        stream = await client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "stream me now"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices == []
    assert chunks[0].model_extra["prompt_filter_results"]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "You said: stream me now"
    assert chunks[-1].choices[0].finish_reason == "stop"


@CLIENTS
@pytest.mark.gen_test
async def test_n_2_gives_two_choices(gateway, make_client):
    async with make_client(gateway) as client:
        completion = await client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "twice"}], n=2
        )
    assert [choice.index for choice in completion.choices] == [0, 1]


@CLIENTS
@pytest.mark.gen_test
async def test_forced_tool_call_streamed_and_not(gateway, make_client):
    request = dict(
        model=DEPLOYMENT,
        messages=[{"role": "user", "content": "Paris"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    async with make_client(gateway) as client:
        completion = await client.chat.completions.create(**request)
        stream = await client.chat.completions.create(**request, stream=True)
        chunks = [chunk async for chunk in stream]
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    streamed_arguments = "".join(
        delta.function.arguments or ""
        for chunk in chunks
        if chunk.choices
        for delta in chunk.choices[0].delta.tool_calls or []
    )
    assert json.loads(streamed_arguments) == json.loads(call.function.arguments)


@CLIENTS
@pytest.mark.gen_test
async def test_json_response_format(gateway, make_client):
    async with make_client(gateway) as client:
        completion = await client.chat.completions.create(
            model=DEPLOYMENT,
            messages=[{"role": "user", "content": "as json"}],
            response_format={"type": "json_object"},
        )
    assert json.loads(completion.choices[0].message.content) == {"echo": "as json"}
    assert gateway.emulator.requests[-1].json["response_format"] == {"type": "json_object"}


@CLIENTS
@pytest.mark.gen_test
async def test_include_usage_puts_usage_on_the_last_chunk(gateway, make_client):
    async with make_client(gateway) as client:
        stream = await client.chat.completions.create(
            model=DEPLOYMENT,
            messages=[{"role": "user", "content": "count me"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens > 0
    assert all(chunk.usage is None for chunk in chunks[:-1])


@CLIENTS
@pytest.mark.gen_test
async def test_rate_limit_surfaces_as_rate_limit_error(gateway, make_client):
    gateway.emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "2000"}))
    async with make_client(gateway, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "2"


@CLIENTS
@pytest.mark.gen_test
async def test_content_filter_surfaces_as_bad_request_with_its_code(gateway, make_client):
    gateway.emulator.add_fault(Fault(kind="content_filter"))
    async with make_client(gateway, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "x"}]
            )
    assert caught.value.code == "content_filter"
    assert caught.value.body["innererror"]["code"] == "ResponsibleAIPolicyViolation"


@CLIENTS
@pytest.mark.gen_test
async def test_bad_temperature_is_refused_by_us_not_azure(gateway, make_client):
    async with make_client(gateway, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=DEPLOYMENT, messages=[{"role": "user", "content": "x"}], temperature=3
            )
    assert caught.value.param == "temperature"
    assert "temperature must be <= 2" in caught.value.message
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
async def test_models_list(gateway):
    async with openai_client(gateway) as client:
        models = await client.models.list()
    assert [model.id for model in models.data] == [DEPLOYMENT]


@pytest.mark.gen_test
async def test_error_mid_stream_reaches_the_sdk_as_an_api_error(gateway):
    gateway.emulator.add_fault(Fault(reset_after=3))
    async with openai_client(gateway, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model=DEPLOYMENT, messages=[{"role": "user", "content": "a b c d e f"}], stream=True
        )
        with pytest.raises(openai.APIError, match="cut"):
            async for _chunk in stream:
                pass


@pytest.mark.gen_test
async def test_azure_route_needs_api_version_and_answers_in_azure_shape(gateway):
    response = await gateway.post(
        f"/openai/deployments/{DEPLOYMENT}/chat/completions",
        {"messages": [{"role": "user", "content": "x"}]},
    )
    assert response.code == 404
    assert json.loads(response.body)["error"]["code"] == "404"
    bad = await gateway.post(
        f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}",
        {"messages": [], "temprature": 1},
    )
    assert bad.code == 400
    assert set(json.loads(bad.body)) == {"error"}


@pytest.mark.gen_test
async def test_bearer_and_api_key_headers_are_accepted_and_not_forwarded(gateway):
    for header in ({"Authorization": f"Bearer {CALLER_KEY}"}, {"api-key": CALLER_KEY}):
        response = await gateway.post(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, headers=header
        )
        assert response.code == 200
        received = gateway.emulator.requests[-1].headers
        assert CALLER_KEY not in json.dumps(received)
        assert "authorization" not in received


@pytest.mark.gen_test
async def test_asynchronous_filter_annotations_reach_the_caller_unchanged(gateway):
    gateway.emulator.async_filter = True
    async with openai_client(gateway) as client:
        stream = await client.chat.completions.create(
            model=DEPLOYMENT,
            messages=[{"role": "user", "content": "one two three four"}],
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    annotations = [c for c in chunks if c.choices and c.choices[0].delta is None]
    assert len(annotations) >= 2
    first = annotations[0].choices[0].model_extra
    assert first["content_filter_offsets"]["end_offset"] > 0
    assert annotations[0].id == ""
    text = "".join(
        c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].delta
    )
    assert text == "You said: one two three four"
