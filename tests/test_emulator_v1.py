"""The emulator's v1 chat and models routes, and answers that SDK parsers accept."""

from __future__ import annotations

import json
from typing import Any, Literal

import openai
import pytest
from pydantic import BaseModel
from tornado.httpclient import AsyncHTTPClient

from emulator import AzureEmulator, Fault

from .conftest import DEPLOYMENT, EMULATOR_KEY


def v1_client(emulator: AzureEmulator) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=emulator.url + "/openai/v1/", api_key=EMULATOR_KEY, max_retries=0
    )


class Step(BaseModel):
    explanation: str
    output: str


class Answer(BaseModel):
    steps: list[Step]
    final: str
    confidence: float
    kind: Literal["short", "long"]
    note: str | None


def ask(text: str) -> list[dict]:
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]


@pytest.mark.gen_test
async def test_v1_chat_takes_the_deployment_from_the_body(emulator):
    async with v1_client(emulator) as client:
        completion = await client.chat.completions.create(
            model=DEPLOYMENT, messages=ask("hello v1")
        )
        stream = await client.chat.completions.create(
            model=DEPLOYMENT,
            messages=ask("stream v1"),
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        with pytest.raises(openai.NotFoundError) as missing:
            await client.chat.completions.create(model="gpt-9", messages=ask("x"))
    assert completion.choices[0].message.content == "You said: hello v1"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == "You said: stream v1"
    )
    assert chunks[-1].usage.total_tokens == 4 + 4
    assert missing.value.code == "DeploymentNotFound"
    record = emulator.requests[0]
    assert (record.path, record.query, record.deployment) == (
        "/openai/v1/chat/completions",
        {},
        DEPLOYMENT,
    )
    assert record.json["model"] == DEPLOYMENT


@pytest.mark.gen_test
async def test_v1_chat_refusals(emulator):
    http = AsyncHTTPClient(force_instance=True)
    try:

        async def post(body: Any, query: str = "", **headers: str):
            response = await http.fetch(
                f"{emulator.url}/openai/v1/chat/completions{query}",
                method="POST",
                body=json.dumps(body),
                headers={"api-key": EMULATOR_KEY, **headers},
                raise_error=False,
            )
            return response.code, json.loads(response.body)["error"]

        code, error = await post({"messages": ask("x")})
        assert (code, error["param"]) == (400, "model")
        code, error = await post({"model": DEPLOYMENT})
        assert (code, error["param"]) == (400, "messages")
        code, error = await post(
            {"model": DEPLOYMENT, "messages": ask("x")}, "?api-version=2024-10-21"
        )
        assert (code, error["code"]) == (404, "404")
        code, error = await post(
            {"model": DEPLOYMENT, "messages": ask("x")}, **{"api-key": "wrong"}
        )
        assert (code, error["code"]) == (401, "401")
    finally:
        http.close()


@pytest.mark.gen_test
async def test_models_list_the_deployments(emulator):
    async with v1_client(emulator) as client:
        listed = await client.models.list()
        one = await client.models.retrieve(DEPLOYMENT)
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("gpt-9")
        emulator.add_fault(Fault(kind="server_error"))
        with pytest.raises(openai.InternalServerError):
            await client.models.list()
    assert [model.id for model in listed.data] == sorted(emulator.deployments)
    assert (one.id, one.object, one.owned_by) == (DEPLOYMENT, "model", "system")
    assert missing.value.code == "model_not_found"
    assert [record.operation for record in emulator.requests] == ["models"] * 4


@pytest.mark.gen_test
async def test_parse_with_a_json_schema_response_format(emulator):
    async with v1_client(emulator) as client:
        parsed = await client.chat.completions.parse(
            model=DEPLOYMENT, messages=ask("Why?"), response_format=Answer
        )
        async with client.chat.completions.stream(
            model=DEPLOYMENT, messages=ask("Why?"), response_format=Answer
        ) as stream:
            streamed = await stream.get_final_completion()
    expected = Answer(steps=[], final="Why?", confidence=0, kind="short", note="Why?")
    assert parsed.choices[0].message.parsed == expected
    assert streamed.choices[0].message.parsed == expected


@pytest.mark.parametrize(
    "tool_choice", ["auto", "required", {"type": "function", "function": {"name": "Answer"}}]
)
@pytest.mark.gen_test
async def test_parse_with_a_pydantic_tool(emulator, tool_choice):
    tools = [openai.pydantic_function_tool(Step), openai.pydantic_function_tool(Answer)]
    first = tools[1] if isinstance(tool_choice, dict) else tools[0]
    async with v1_client(emulator) as client:
        parsed = await client.chat.completions.parse(
            model=DEPLOYMENT, messages=ask("Explain"), tools=tools, tool_choice=tool_choice
        )
    [call] = parsed.choices[0].message.tool_calls
    assert call.function.name == first["function"]["name"]
    model = Answer if call.function.name == "Answer" else Step
    assert isinstance(call.function.parsed_arguments, model)
    assert parsed.choices[0].finish_reason == "tool_calls"
