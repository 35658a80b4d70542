"""Bodies of current models through the gateway: Azure sees them unchanged; certain errors stay ours.

The official `openai` SDK as the client, the emulator as Azure.
"""

from __future__ import annotations

import json

import openai
import pytest

from .conftest import DEPLOYMENT
from .support.sdk_clients import CLIENTS, azure_client

CURRENT_FIELDS = {
    "reasoning_effort": "high",
    "store": True,
    "metadata": {"session": "s-1", "tenant": "t-7"},
    "prediction": {"type": "content", "content": "The previous answer"},
    "modalities": ["text"],
    "prompt_cache_key": "tenant-7",
    "service_tier": "auto",
}
MESSAGES = [
    {"role": "developer", "content": "Answer in one word."},
    {"role": "user", "content": "current models"},
]
FUTURE_FIELD = {"a_future_field": {"enabled": True, "levels": [1, 2]}}


@pytest.mark.gen_test
async def test_a_langchain_style_azure_body_reaches_azure_unchanged(gateway):
    """`"model": null` (AzureChatOpenAI), a developer message, current fields, an unknown one."""
    async with azure_client(gateway) as client:
        completion = await client.chat.completions.create(
            model="ignored-by-the-azure-route",
            messages=MESSAGES,
            user=None,
            **CURRENT_FIELDS,
            extra_body={"model": None, **FUTURE_FIELD},
        )
    assert completion.choices[0].message.content == "You said: current models"
    assert gateway.emulator.requests[-1].json == {
        "model": None,
        "messages": MESSAGES,
        "user": None,
        **CURRENT_FIELDS,
        **FUTURE_FIELD,
    }


@CLIENTS
@pytest.mark.gen_test
async def test_current_fields_reach_azure_unchanged_on_both_routes(gateway, make_client):
    async with make_client(gateway) as client:
        await client.chat.completions.create(
            model=DEPLOYMENT, messages=MESSAGES, **CURRENT_FIELDS, extra_body=FUTURE_FIELD
        )
    received = gateway.emulator.requests[-1].json
    assert received == {"model": DEPLOYMENT, "messages": MESSAGES, **CURRENT_FIELDS, **FUTURE_FIELD}


@CLIENTS
@pytest.mark.gen_test
async def test_a_temperature_of_5_is_our_400_and_never_reaches_azure(gateway, make_client):
    async with make_client(gateway, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=DEPLOYMENT, messages=MESSAGES, temperature=5, **CURRENT_FIELDS
            )
    error = caught.value.body
    assert error["param"] == "temperature"
    assert "temperature must be <= 2 (got 5)" in error["message"]
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
async def test_the_original_route_forwards_current_fields_and_still_refuses_typos(gateway):
    response = await gateway.post(
        "/v1/gpt/chat",
        {"prompt": "hello", "model": "gpt-5", "reasoning_effort": "low", "store": False},
    )
    assert response.code == 200, response.body
    assert gateway.emulator.requests[-1].json == {
        "messages": [{"role": "user", "content": "hello"}],
        "reasoning_effort": "low",
        "store": False,
    }
    typo = await gateway.post("/v1/gpt/chat", {"prompt": "hello", "reasoning_efort": "low"})
    assert typo.code == 400
    assert json.loads(typo.body)["error"]["param"] == "reasoning_efort"
    assert len(gateway.emulator.requests) == 1
