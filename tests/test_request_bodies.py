"""Bodies that once got a 500 or meant two things, over real sockets: each a clear 400, none sent upstream."""

from __future__ import annotations

import json

import pytest

from .conftest import API_VERSION, DEPLOYMENT
from .test_access_control import BOB_KEY, write_deployments_file

MESSAGES = [{"role": "user", "content": "hi"}]
AZURE_PATH = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
ROUTES = ("/v1/gpt/chat", "/v1/chat/completions", AZURE_PATH)


def error_of(response) -> dict:
    return json.loads(response.body)["error"]


def with_tool_parameters(parameters_json: str) -> bytes:
    return (
        '{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", '
        f'"function": {{"name": "f", "parameters": {parameters_json}}}}}]}}'
    ).encode()


@pytest.mark.gen_test
@pytest.mark.parametrize("route", ROUTES)
async def test_deep_nesting_is_a_400_naming_the_limit(gateway, route):
    for body in (b"[" * 1000 + b"]" * 1000, with_tool_parameters("[" * 900 + "]" * 900)):
        response = await gateway.post(route, body)
        assert response.code == 400, body[:40]
        assert error_of(response)["code"] == "invalid_json"
        assert "deeper than 64 levels" in error_of(response)["message"]
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
async def test_a_deep_free_form_field_next_to_a_mistake_is_described(gateway):
    deep = "[" * 58 + "]" * 58
    body = with_tool_parameters(deep).replace(b'"name": "f"', b'"name": "f", "strict": "yes"')
    response = await gateway.post("/v1/chat/completions", body)
    assert response.code == 400
    assert error_of(response)["param"] == "tools[0].function.strict"
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "body, param, words",
    [
        (
            {"prompt": "x", "stop": 1},
            "stop",
            "stop must be of type string or null or array (got 1)",
        ),
        ({}, None, "needs one of the fields 'prompt', 'userPrompt', 'messages'"),
        (True, None, "must be a JSON object"),
        ({"prompt": "x", "stop": {"a": 1}}, "stop", "must be of type string or null or array"),
    ],
)
async def test_gpt_chat_bodies_that_were_500s(gateway, body, param, words):
    response = await gateway.post("/v1/gpt/chat", body)
    assert response.code == 400
    answer = json.loads(response.body)
    assert answer["success"] == 0 and answer["error"]["param"] == param
    assert words in answer["message"]
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
@pytest.mark.parametrize("route", ROUTES)
async def test_a_repeated_key_is_refused_by_name(gateway, route):
    stream = b'{"prompt": "x", "messages": [{"role": "user", "content": "hi"}], "stream": true, "stream": false}'
    response = await gateway.post(route, stream)
    assert response.code == 400
    assert error_of(response)["param"] == "stream" and error_of(response)["rule"] == "duplicate_key"
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
async def test_a_second_model_cannot_slip_past_a_keys_model_list(tmp_path, emulator, start_gateway):
    # Bob may use gpt-4o only; a parser that takes the first "model" would let the second through.
    path = write_deployments_file(
        tmp_path, emulator.url, [{"name": "bob", "key": BOB_KEY, "models": ["gpt-4o"]}]
    )
    gateway = start_gateway(DEPLOYMENTS_FILE=path)
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}'
    response = await gateway.post("/v1/chat/completions", body, headers={"api-key": BOB_KEY})
    assert response.code == 400
    assert error_of(response)["param"] == "model"
    assert 'the key "model" twice' in error_of(response)["message"]
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"prompt": "x", "temperature": NaN}', "NaN and Infinity are not JSON numbers"),
        (b'{"prompt": "x", "temperature": Infinity}', "NaN and Infinity are not JSON numbers"),
        ('{"prompt": "x"}'.encode("utf-16"), "UTF-16 or UTF-32"),
        ('{"prompt": "x"}'.encode("utf-16-be"), "UTF-16 or UTF-32"),
        (b'\xef\xbb\xbf{"prompt": "x"}', "byte-order mark"),
        (b'{"prompt": "\xed\xa0\x80"}', "not valid UTF-8"),
        (b'{"prompt": "\\udfff"}', "surrogate"),
        (b'{"prompt": "x", "temperature": 1e400}', "too large"),
    ],
)
async def test_bodies_with_two_meanings_are_refused(gateway, raw, words):
    for route in ROUTES:
        response = await gateway.post(route, raw)
        assert response.code == 400, route
        assert error_of(response)["code"] == "invalid_json"
        assert words in error_of(response)["message"]
    assert gateway.emulator.requests == []


@pytest.mark.gen_test
async def test_what_goes_upstream_is_the_document_that_was_checked(gateway):
    raw = (
        b'{ "model" : "gpt-4o",\n  "messages": [{"role": "user", "content": "caf\\u00e9 \\"ok\\""}],'
        b' "temperature": 1E0, "max_tokens": 10 }'
    )
    response = await gateway.post("/v1/chat/completions", raw)
    assert response.code == 200
    (sent,) = gateway.emulator.requests
    assert (
        sent.body
        == (
            '{"model":"gpt-4o","messages":[{"role":"user","content":"café \\"ok\\""}],'
            '"temperature":1.0,"max_tokens":10}'
        ).encode()
    )
