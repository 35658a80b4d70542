"""Azure's v1 API upstream and inbound, models, 404s and rate-limit headers."""

from __future__ import annotations

import json
import logging

import openai
import pytest
from pydantic import BaseModel

from emulator import Fault

from .conftest import DEPLOYMENT, EMULATOR_KEY
from .support.deployments import write_deployments_file

AZURE_NAME = "other-deployment"  # the Azure deployment; callers know it as "gpt-4o-mini"
LIMITED_KEY = "limited-caller-key-3390"
MINI_ONLY_KEY = "mini-only-caller-key-7781"


def deployment(emulator, name: str, azure: str, version: str, models: list[str]) -> dict:
    return {
        "name": name,
        "endpoint": emulator.url,
        "deployment": azure,
        "api_version": version,
        "key": EMULATOR_KEY,
        "models": models,
    }


@pytest.fixture
def v1_deployment(tmp_path, emulator, start_gateway):
    def start(version: str = "v1", **env: str):
        path = write_deployments_file(
            tmp_path, [deployment(emulator, "main", AZURE_NAME, version, ["gpt-4o-mini"])]
        )
        return start_gateway(DEPLOYMENTS_FILE=path, MAX_ATTEMPTS="1", **env)

    return start


def v1_client(gateway, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/openai/v1/", api_key=key, max_retries=0)


@pytest.mark.gen_test
async def test_the_v1_base_url_for_chat_responses_and_embeddings(v1_deployment):
    gateway = v1_deployment()
    async with v1_client(gateway) as client:
        chat = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "v1 chat"}]
        )
        assert chat.choices[0].message.content == "You said: v1 chat"
        chat_request = gateway.emulator.requests[-1]
        response = await client.responses.create(model="gpt-4o-mini", input="v1 responses")
        responses_request = gateway.emulator.requests[-1]
        vectors = await client.embeddings.create(model="gpt-4o-mini", input="v1 embeddings")
        embeddings_request = gateway.emulator.requests[-1]
    assert response.output_text and vectors.data
    assert [
        (r.path, r.query, r.json["model"])
        for r in (chat_request, responses_request, embeddings_request)
    ] == [
        ("/openai/v1/chat/completions", {}, AZURE_NAME),
        ("/openai/v1/responses", {}, AZURE_NAME),
        ("/openai/v1/embeddings", {}, AZURE_NAME),
    ]
    assert chat_request.json["messages"] == [{"role": "user", "content": "v1 chat"}]


@pytest.mark.gen_test
async def test_preview_adds_its_api_version_and_a_stream_keeps_usage(v1_deployment):
    gateway = v1_deployment("preview")
    async with v1_client(gateway) as client:
        stream = await client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "p"}], stream=True
        )
        chunks = [chunk async for chunk in stream]
    received = gateway.emulator.requests[-1]
    assert received.path == "/openai/v1/chat/completions"
    assert received.query == {"api-version": "preview"}
    assert received.json["model"] == AZURE_NAME
    assert received.json["stream_options"] == {"include_usage": True}
    assert all(chunk.usage is None for chunk in chunks), "the usage event we asked for is ours"


@pytest.mark.gen_test
async def test_the_original_route_on_a_v1_deployment_names_the_model(v1_deployment):
    gateway = v1_deployment()
    response = await gateway.post("/v1/gpt/chat", {"prompt": "original"})
    assert json.loads(response.body)["success"] == 1
    assert gateway.emulator.requests[-1].json["model"] == AZURE_NAME


class Weather(BaseModel):
    city: str
    celsius: float


@pytest.mark.gen_test
async def test_parse_with_a_pydantic_model_and_with_a_tool(v1_deployment):
    gateway = v1_deployment()
    async with v1_client(gateway) as client:
        parsed = await client.chat.completions.parse(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "weather in Oslo"}],
            response_format=Weather,
        )
        assert isinstance(parsed.choices[0].message.parsed, Weather)
        for choice in ("auto", {"type": "function", "function": {"name": "Weather"}}):
            called = await client.chat.completions.parse(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "weather in Oslo"}],
                tools=[openai.pydantic_function_tool(Weather)],
                tool_choice=choice,
            )
            calls = called.choices[0].message.tool_calls
            assert calls and isinstance(calls[0].function.parsed_arguments, Weather)


@pytest.fixture
def two_models(tmp_path, emulator, start_gateway):
    path = write_deployments_file(
        tmp_path,
        [
            deployment(emulator, "big", DEPLOYMENT, "v1", [DEPLOYMENT]),
            deployment(emulator, "small", AZURE_NAME, "v1", ["gpt-4o-mini"]),
        ],
        keys=[
            {"name": "limited", "key": LIMITED_KEY, "rpm": 100},
            {"name": "mini", "key": MINI_ONLY_KEY, "models": ["gpt-4o-mini"]},
        ],
    )
    return start_gateway(DEPLOYMENTS_FILE=path, MAX_ATTEMPTS="1")


@pytest.mark.gen_test
async def test_an_unknown_model_is_named_with_what_the_caller_may_use(two_models):
    async with v1_client(two_models, MINI_ONLY_KEY) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            await client.responses.create(model="gpt-5-nano", input="x")
        listed = [model.id async for model in client.models.list()]
        mini = await client.models.retrieve("gpt-4o-mini")
        with pytest.raises(openai.NotFoundError) as hidden:
            await client.models.retrieve(DEPLOYMENT)
    assert listed == ["gpt-4o-mini"] and mini.id == "gpt-4o-mini"
    assert "'gpt-5-nano'" in raised.value.message and "'gpt-4o-mini'" in raised.value.message
    assert f"'{DEPLOYMENT}'" not in raised.value.message
    assert raised.value.code == "model_not_found"
    assert f"'{DEPLOYMENT}'" in hidden.value.message


@pytest.mark.gen_test
async def test_models_on_every_path(two_models):
    headers = {"Authorization": f"Bearer {LIMITED_KEY}"}
    for path in ("/v1/models", "/openai/v1/models"):
        listed = json.loads((await two_models.get(path, headers=headers)).body)
        assert [model["id"] for model in listed["data"]][:2] == ["big", DEPLOYMENT]
    for path in ("/v1/models/small", "/openai/v1/models/gpt-4o-mini"):
        found = await two_models.get(path, headers=headers)
        assert found.code == 200 and json.loads(found.body)["object"] == "model"


@pytest.mark.gen_test
async def test_an_unknown_route_names_method_and_path(gateway):
    response = await gateway.get("/v1/nothing/here")
    body = json.loads(response.body)
    assert response.code == 404
    assert body["message"] == "API Not found."
    assert body["error"]["message"] == "No route for GET /v1/nothing/here"
    wrong_method = await gateway.get("/v1/embeddings")
    assert wrong_method.code == 405
    assert "GET" in json.loads(wrong_method.body)["error"]["message"]


@pytest.mark.gen_test
async def test_azure_429_gives_both_retry_headers(gateway):
    gateway.emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "2500"}))
    response = await gateway.post(
        "/v1/chat/completions",
        {"model": DEPLOYMENT, "messages": [{"role": "user", "content": "x"}]},
    )
    assert response.code == 429
    assert response.headers["retry-after-ms"] == "2500"
    assert response.headers["Retry-After"] == "3"


@pytest.mark.gen_test
async def test_every_deployment_cooling_gives_both_retry_headers(start_gateway):
    gateway = start_gateway(MAX_RETRY_WAIT="0", MAX_ATTEMPTS="3")
    gateway.emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after": "30"}))
    body = {"model": DEPLOYMENT, "input": "x"}
    await gateway.post("/v1/embeddings", body)
    response = await gateway.post("/v1/embeddings", body)
    assert response.code == 429
    assert json.loads(response.body)["error"]["code"] == "all_deployments_busy"
    assert 29_000 < int(response.headers["retry-after-ms"]) <= 30_000
    assert response.headers["Retry-After"] == "30"


AZURE_LIMITS = {"x-ratelimit-remaining-requests": "42", "x-ratelimit-remaining-tokens": "8000"}


async def limits_seen(gateway, key: str) -> dict[str, str | None]:
    gateway.emulator.add_fault(Fault(headers=AZURE_LIMITS))
    response = await gateway.post(
        "/v1/embeddings",
        {"model": "gpt-4o-mini", "input": "x"},
        headers={"Authorization": f"Bearer {key}"},
    )
    assert response.code == 200
    return {name: response.headers.get(name) for name in AZURE_LIMITS}


@pytest.mark.gen_test
async def test_azures_remaining_limits_reach_callers_without_limits_of_their_own(two_models):
    assert await limits_seen(two_models, MINI_ONLY_KEY) == AZURE_LIMITS
    # A key with limits sees its own (100 requests a minute, one used), never Azure's.
    assert await limits_seen(two_models, LIMITED_KEY) == {
        "x-ratelimit-remaining-requests": "99",
        "x-ratelimit-remaining-tokens": None,
    }


@pytest.mark.gen_test
async def test_a_wrong_method_on_an_api_route_is_logged_like_any_answer(gateway, caplog):
    caplog.set_level(logging.INFO, logger="azure-gpt-api.access")
    response = await gateway.client.fetch(
        gateway.url + "/v1/responses/resp_1/cancel", method="DELETE", raise_error=False
    )
    assert response.code == 405
    assert "DELETE" in json.loads(response.body)["error"]["message"]
    logged = [
        json.loads(r.getMessage()) for r in caplog.records if r.name == "azure-gpt-api.access"
    ]
    assert [(line["route"], line["status"]) for line in logged] == [("responses_cancel", 405)]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
