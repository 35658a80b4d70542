"""The Azure OpenAI emulator, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPResponse

from emulator import AzureEmulator, Fault
from gateway.upstream.httpclient import KeepAliveHTTPClient

KEY = "test-emulator-key"
VERSION = "2024-10-21"
MODEL = "gpt-4o-2024-08-06"
SAFE = {"filtered": False, "severity": "safe"}


@pytest.fixture
def emulator(io_loop: Any) -> Any:
    emu = AzureEmulator(key=KEY, deployments=("gpt-4o", "backup"))
    io_loop.run_sync(emu.start)
    yield emu
    io_loop.run_sync(emu.stop)


@pytest.fixture
def client(io_loop: Any) -> Any:
    http = AsyncHTTPClient(force_instance=True)
    yield http
    http.close()


@pytest.fixture
def keep_alive(io_loop: Any) -> Any:
    """A client that keeps connections alive (Tornado's simple client opens one per request)."""
    http = KeepAliveHTTPClient(force_instance=True)
    yield http
    http.close()


async def chat(
    emulator: AzureEmulator,
    client: AsyncHTTPClient,
    body: Any,
    *,
    deployment: str = "gpt-4o",
    query: str = f"?api-version={VERSION}",
    key: str | None = KEY,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> HTTPResponse:
    return await client.fetch(
        f"{emulator.url}/openai/deployments/{deployment}/chat/completions{query}",
        method="POST",
        body=body if isinstance(body, bytes) else json.dumps(body),
        headers={
            "Content-Type": "application/json",
            **({"api-key": key} if key else {}),
            **(headers or {}),
        },
        raise_error=False,
        **kwargs,
    )


def ask(text: str, **extra: Any) -> dict:
    return {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}],
        **extra,
    }


def events(body: bytes) -> list[Any]:
    """Split an SSE body into its data payloads: parsed JSON, or the raw [DONE] string."""
    assert body.endswith(b"\n\n")
    payloads = []
    for event in body.decode().split("\n\n")[:-1]:
        assert event.startswith("data: ")
        data = event.removeprefix("data: ")
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def joined(chunks: list[dict], index: int = 0) -> str:
    deltas = [
        choice["delta"]
        for chunk in chunks
        for choice in chunk["choices"]
        if choice["index"] == index
    ]
    return "".join(delta.get("content") or "" for delta in deltas)


# --- refusals -----------------------------------------------------------------


@pytest.mark.gen_test
async def test_wrong_or_missing_key_is_azure_401(emulator, client):
    for key in ("nope", None):
        response = await chat(
            emulator, client, ask("hi"), key=key, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert response.code == 401
        assert json.loads(response.body) == {
            "error": {
                "code": "401",
                "message": (
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide a valid key "
                    "for an active subscription and use a correct regional API endpoint for your resource."
                ),
            }
        }
    assert len(emulator.requests) == 2
    assert emulator.requests[0].headers["api-key"] == "nope"
    assert "api-key" not in emulator.requests[1].headers
    assert emulator.requests[0].finished.is_set()


@pytest.mark.gen_test
async def test_missing_api_version_or_unknown_path_is_resource_not_found(emulator, client):
    response = await chat(emulator, client, ask("hi"), query="")
    assert response.code == 404
    assert json.loads(response.body) == {"error": {"code": "404", "message": "Resource not found"}}
    assert emulator.requests[-1].query == {}
    other = await client.fetch(emulator.url + "/openai/models", raise_error=False)
    assert other.code == 404 and json.loads(other.body)["error"]["message"] == "Resource not found"


@pytest.mark.gen_test
async def test_only_listed_api_versions_are_served(io_loop, client):
    emu = AzureEmulator(key=KEY, api_versions=["2024-10-21"])
    await emu.start()
    try:
        assert (await chat(emu, client, ask("hi"))).code == 200
        assert (await chat(emu, client, ask("hi"), query="?api-version=2023-05-15")).code == 404
    finally:
        await emu.stop()


@pytest.mark.gen_test
async def test_unknown_deployment_is_deployment_not_found(emulator, client):
    response = await chat(emulator, client, ask("hi"), deployment="gpt-5")
    assert response.code == 404
    error = json.loads(response.body)["error"]
    assert error["code"] == "DeploymentNotFound"
    assert error["message"].startswith("The API deployment for this resource does not exist.")
    assert emulator.requests[-1].deployment == "gpt-5"


@pytest.mark.gen_test
async def test_bad_bodies_are_invalid_request_errors(emulator, client):
    for body, param in (
        (b"{not json", None),
        ({"model": "x"}, "messages"),
        ({"messages": []}, "messages"),
        (ask("hi", n=0), "n"),
    ):
        response = await chat(emulator, client, body)
        assert response.code == 400
        error = json.loads(response.body)["error"]
        assert (
            error["type"] == "invalid_request_error"
            and error["param"] == param
            and error["message"]
        )
    assert [record.json for record in emulator.requests][:2] == [None, {"model": "x"}]
    assert emulator.requests[0].body == b"{not json"


# --- answers ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_non_stream_answer_has_azure_shape_and_word_usage(emulator, client):
    response = await chat(
        emulator, client, ask("hello there world"), headers={"x-request-id": "trace-1"}
    )
    assert response.code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["apim-request-id"]
    assert response.headers["x-request-id"] == "trace-1"
    assert response.headers["x-ms-region"] == "emulator"
    body = json.loads(response.body)
    assert body["id"].startswith("chatcmpl-emu-")
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["system_fingerprint"] and abs(body["created"] - time.time()) < 60
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "stop" and choice["logprobs"] is None
    assert choice["message"] == {
        "role": "assistant",
        "content": "You said: hello there world",
        "refusal": None,
    }
    assert choice["content_filter_results"]["hate"] == SAFE
    assert choice["content_filter_results"]["protected_material_text"] == {
        "filtered": False,
        "detected": False,
    }
    [prompt_filter] = body["prompt_filter_results"]
    assert prompt_filter["content_filter_results"]["jailbreak"] == {
        "filtered": False,
        "detected": False,
    }
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}

    record = emulator.requests[-1]
    assert (record.method, record.path, record.query) == (
        "POST",
        "/openai/deployments/gpt-4o/chat/completions",
        {"api-version": VERSION},
    )
    assert record.deployment == "gpt-4o" and record.json == ask("hello there world")
    assert record.response_body == response.body
    assert record.finished.is_set() and not record.client_gone.is_set()


@pytest.mark.gen_test
async def test_content_parts_n_and_max_tokens(emulator, client):
    parts = [
        {"type": "text", "text": "look at"},
        {"type": "image_url", "image_url": {"url": "x"}},
        {"type": "text", "text": "this"},
    ]
    body = json.loads(
        (
            await chat(emulator, client, {"messages": [{"role": "user", "content": parts}], "n": 2})
        ).body
    )
    contents = [choice["message"]["content"] for choice in body["choices"]]
    assert contents == ["You said: look at this", "You said (1): look at this"]
    assert body["usage"]["completion_tokens"] == 5 + 6

    for limit in ({"max_tokens": 3}, {"max_completion_tokens": 3}):
        body = json.loads((await chat(emulator, client, ask("one two three four", **limit))).body)
        assert body["choices"][0]["message"]["content"] == "You said: one"
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3


@pytest.mark.gen_test
async def test_json_mode_answers_a_json_string(emulator, client):
    for response_format in (
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "echo"}},
    ):
        body = json.loads(
            (await chat(emulator, client, ask("hi you", response_format=response_format))).body
        )
        assert json.loads(body["choices"][0]["message"]["content"]) == {"echo": "hi you"}


TOOLS = [
    {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "other"}},
]


@pytest.mark.gen_test
async def test_forced_tool_and_function_calls(emulator, client):
    named = {"type": "function", "function": {"name": "other"}}
    for tool_choice, name in (("required", "lookup"), (named, "other")):
        body = ask("find it", tools=TOOLS, tool_choice=tool_choice)
        choice = json.loads((await chat(emulator, client, body)).body)["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["type"] == "function"
        assert call["function"]["name"] == name
        assert json.loads(call["function"]["arguments"]) == {"echo": "find it"}

    for tool_choice in ("auto", None):  # no tool_choice with tools given means auto
        auto = json.loads(
            (await chat(emulator, client, ask("x", tools=TOOLS, tool_choice=tool_choice))).body
        )
        assert auto["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    none = json.loads(
        (await chat(emulator, client, ask("x", tools=TOOLS, tool_choice="none"))).body
    )
    assert none["choices"][0]["message"]["content"] == "You said: x"
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
    answered = ask("x", tools=TOOLS, tool_choice="auto")
    answered["messages"] += [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "found"},
    ]
    final = json.loads((await chat(emulator, client, answered)).body)["choices"][0]
    assert (final["finish_reason"], final["message"]["content"]) == ("stop", "You said: x")

    legacy = ask("old style", functions=[{"name": "f"}], function_call={"name": "f"})
    choice = json.loads((await chat(emulator, client, legacy)).body)["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {
        "name": "f",
        "arguments": json.dumps({"echo": "old style"}),
    }


# --- streams ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_stream_event_sequence(emulator, client):
    response = await chat(emulator, client, ask("stream this please", stream=True))
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    payloads = events(response.body)
    assert payloads[-1] == "[DONE]"
    first, *chunks = payloads[:-1]
    assert first["choices"] == [] and first["id"] == "" and first["prompt_filter_results"]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    words = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]
    assert words == ["You", " said:", " stream", " this", " please"]
    assert (
        chunks[-1]["choices"][0]["delta"] == {}
        and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    )
    assert all(chunk["finish_reason"] is None for c in chunks[:-1] for chunk in c["choices"])
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]}
    assert all(
        chunk["object"] == "chat.completion.chunk" and chunk["model"] == MODEL for chunk in chunks
    )
    assert not any("usage" in payload for payload in payloads[:-1])
    assert emulator.requests[-1].response_body == response.body
    assert emulator.requests[-1].finished.is_set()


@pytest.mark.gen_test
async def test_stream_usage_chunk_only_with_include_usage(emulator, client):
    response = await chat(
        emulator, client, ask("count me  in ", stream=True, stream_options={"include_usage": True})
    )
    payloads = events(response.body)[:-1]
    assert all(payload["usage"] is None for payload in payloads[:-1])
    assert payloads[-1]["choices"] == []
    assert payloads[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 5, "total_tokens": 10}
    assert joined(payloads) == "You said: count me  in "


@pytest.mark.gen_test
async def test_stream_with_two_choices(emulator, client):
    payloads = events((await chat(emulator, client, ask("hey", stream=True, n=2))).body)[:-1]
    assert joined(payloads, 0) == "You said: hey"
    assert joined(payloads, 1) == "You said (1): hey"
    finishes = [c for p in payloads for c in p["choices"] if c["finish_reason"]]
    assert [(c["index"], c["finish_reason"]) for c in finishes] == [(0, "stop"), (1, "stop")]


@pytest.mark.gen_test
async def test_stream_forced_tool_call_deltas(emulator, client):
    body = ask("find it", stream=True, tools=TOOLS, tool_choice="required")
    payloads = events((await chat(emulator, client, body)).body)
    deltas = [payload["choices"][0]["delta"] for payload in payloads[1:-1]]
    assert deltas[0] == {"role": "assistant", "content": None}
    calls = [delta["tool_calls"][0] for delta in deltas[1:-1]]
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "lookup", "arguments": ""}
    pieces = [call["function"]["arguments"] for call in calls[1:]]
    assert 2 <= len(pieces) <= 3
    assert json.loads("".join(pieces)) == {"echo": "find it"}
    assert deltas[-1] == {} and payloads[-2]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.gen_test
async def test_stream_forced_legacy_function_call_deltas(emulator, client):
    body = ask("find it", stream=True, functions=[{"name": "f"}], function_call={"name": "f"})
    payloads = events((await chat(emulator, client, body)).body)
    calls = [payload["choices"][0]["delta"]["function_call"] for payload in payloads[2:-2]]
    assert calls[0] == {"name": "f", "arguments": ""}
    assert json.loads("".join(call["arguments"] for call in calls[1:])) == {"echo": "find it"}
    assert payloads[-2]["choices"][0]["finish_reason"] == "function_call"


# --- faults -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, status, error",
    [
        ("rate_limit", 429, {"code": "429"}),
        ("content_filter", 400, {"code": "content_filter", "param": "prompt", "status": 400}),
        ("server_error", 500, {"type": "server_error", "code": None}),
        ("unavailable", 503, {"type": "server_error", "code": None}),
        ("timeout", 408, {"code": "Timeout", "message": "The operation was timeout."}),
    ],
)
@pytest.mark.gen_test
async def test_fault_presets_answer_azure_errors_to_plain_and_stream_requests(
    emulator, client, kind, status, error
):
    emulator.add_fault(Fault(kind=kind, times=2))
    for stream in (False, True):
        response = await chat(emulator, client, ask("x", stream=stream))
        assert response.code == status
        assert response.headers["Content-Type"] == "application/json"
        assert response.headers["apim-request-id"]
        assert error.items() <= json.loads(response.body)["error"].items()
    assert (await chat(emulator, client, ask("x"))).code == 200


@pytest.mark.gen_test
async def test_rate_limit_retry_headers_agree(emulator, client):
    for headers, seconds in (
        ({}, "1"),
        ({"Retry-After-Ms": "4000"}, "4"),
        ({"retry-after": "2"}, "2"),
    ):
        emulator.add_fault(Fault(kind="rate_limit", headers=headers))
        response = await chat(emulator, client, ask("x"))
        assert (response.headers["retry-after"], response.headers["retry-after-ms"]) == (
            seconds,
            seconds + "000",
        )
        assert f"retry after {seconds} seconds" in json.loads(response.body)["error"]["message"]


@pytest.mark.gen_test
async def test_content_filter_fault_carries_the_policy_violation(emulator, client):
    emulator.add_fault(Fault(kind="content_filter"))
    inner = json.loads((await chat(emulator, client, ask("x"))).body)["error"]["innererror"]
    assert inner["code"] == "ResponsibleAIPolicyViolation"
    assert inner["content_filter_result"]["violence"] == {"filtered": True, "severity": "medium"}
    assert inner["content_filter_result"]["hate"] == SAFE


@pytest.mark.gen_test
async def test_faults_are_fifo_counted_and_skip_refused_requests(emulator, client):
    emulator.add_fault(Fault(status=418, body={"error": {"code": "teapot"}}, times=2))
    emulator.add_fault(Fault(status=502, headers={"x-extra": "1"}))
    assert (await chat(emulator, client, ask("x"), key="bad")).code == 401
    first, second = await chat(emulator, client, ask("x")), await chat(emulator, client, ask("x"))
    assert first.code == second.code == 418 and json.loads(first.body) == {
        "error": {"code": "teapot"}
    }
    third = await chat(emulator, client, ask("x"))
    assert (
        third.code == 502
        and third.headers["x-extra"] == "1"
        and json.loads(third.body)["error"]["code"] == "502"
    )
    assert (await chat(emulator, client, ask("x"))).code == 200

    emulator.add_fault(Fault(headers={"x-ratelimit-remaining-requests": "7"}))
    emulator.clear()
    plain = await chat(emulator, client, ask("x"))
    assert plain.code == 200 and "x-ratelimit-remaining-requests" not in plain.headers
    assert len(emulator.requests) == 1 and json.loads(plain.body)["id"] == "chatcmpl-emu-1"
    emulator.add_fault(Fault(headers={"x-ratelimit-remaining-requests": "7"}))
    assert (await chat(emulator, client, ask("x"))).headers["x-ratelimit-remaining-requests"] == "7"


def test_fault_from_json_validates():
    fault = Fault.from_json({"kind": "rate_limit", "times": 2, "delay": 0.5})
    assert (fault.status, fault.times, fault.delay) == (429, 2, 0.5)
    with pytest.raises(ValueError, match="'dealy'"):
        Fault.from_json({"dealy": 1})
    with pytest.raises(ValueError, match="'teapot'"):
        Fault.from_json({"kind": "teapot"})
    with pytest.raises(ValueError, match="times"):
        Fault.from_json({"times": 0})
    with pytest.raises(ValueError):
        Fault.from_json([{"status": 500}])  # type: ignore[arg-type]


@pytest.mark.gen_test
async def test_delay_comes_before_answers_and_errors(emulator, client):
    for fault in (Fault(delay=0.2), Fault(kind="server_error", delay=0.2)):
        emulator.add_fault(fault)
        started = time.monotonic()
        response = await chat(emulator, client, ask("x"))
        assert 0.15 <= time.monotonic() - started < 3
        assert response.code == (fault.status or 200)


@pytest.mark.gen_test
async def test_chunk_gap_spaces_the_events(emulator, client):
    emulator.add_fault(Fault(chunk_gap=0.05))
    arrivals: list[float] = []
    response = await chat(
        emulator,
        client,
        ask("one two three", stream=True),
        streaming_callback=lambda chunk: arrivals.append(time.monotonic()),
    )
    assert response.code == 200
    assert len(events(emulator.requests[-1].response_body)) == 9  # so 8 gaps of 0.05 s
    assert len(arrivals) >= 5
    assert 0.3 <= arrivals[-1] - arrivals[0] < 3


@pytest.mark.gen_test
async def test_reset_after_drops_the_connection_after_n_events(emulator, keep_alive):
    emulator.add_fault(Fault(reset_after=3))
    received: list[bytes] = []
    with pytest.raises(HTTPClientError, match="reset"):
        await chat(
            emulator, keep_alive, ask("a b c d e", stream=True), streaming_callback=received.append
        )
    assert len(events(b"".join(received))) == 3
    record = emulator.requests[-1]
    assert not record.finished.is_set() and not record.client_gone.is_set()

    emulator.add_fault(Fault(reset_after=0))  # a non-stream request is dropped before any byte
    with pytest.raises(HTTPClientError):
        await chat(emulator, keep_alive, ask("not streamed"))


@pytest.mark.gen_test
async def test_hang_is_released_when_the_client_goes_away(emulator, client):
    emulator.add_fault(Fault(hang=True))
    started = time.monotonic()
    with pytest.raises(HTTPClientError, match="Timeout"):
        await chat(emulator, client, ask("x"), request_timeout=0.3)
    record = emulator.requests[-1]
    await asyncio.wait_for(record.client_gone.wait(), 2)
    assert not record.finished.is_set()
    assert time.monotonic() - started < 2


@pytest.mark.gen_test
async def test_stop_ends_a_stream_in_progress(emulator, client):
    emulator.add_fault(Fault(chunk_gap=30))
    first_event = asyncio.Event()
    request = asyncio.ensure_future(
        chat(
            emulator,
            client,
            ask("x", stream=True),
            streaming_callback=lambda chunk: first_event.set(),
        )
    )
    await asyncio.wait_for(first_event.wait(), 2)
    await asyncio.wait_for(emulator.stop(), 2)
    with pytest.raises(HTTPClientError):
        await request
    record = emulator.requests[-1]
    assert record.client_gone.is_set() and not record.finished.is_set()


# --- control routes and connections ----------------------------------------------


@pytest.mark.gen_test
async def test_control_routes(emulator, client):
    async def control(method: str, path: str, body: Any = None) -> HTTPResponse:
        return await client.fetch(
            emulator.url + path,
            method=method,
            raise_error=False,
            body=None if body is None else json.dumps(body),
        )

    queued = await control(
        "POST", "/_emulator/faults", [{"kind": "rate_limit"}, {"status": 418, "times": 2}]
    )
    assert queued.code == 200 and json.loads(queued.body) == {"queued": 2}
    refused = await control("POST", "/_emulator/faults", [{"status": 500}, {"bogus": 1}])
    assert refused.code == 400 and "'bogus'" in json.loads(refused.body)["error"]["message"]
    assert (await control("POST", "/_emulator/faults", {"kind": "rate_limit"})).code == 200

    codes = [
        (await chat(emulator, client, ask("x"), headers={"Authorization": f"Bearer {KEY}"})).code
        for _ in range(5)
    ]
    assert codes == [429, 418, 418, 429, 200]

    listed = json.loads((await control("GET", "/_emulator/requests")).body)
    assert len(listed) == 5
    assert listed[0]["method"] == "POST" and listed[0]["query"] == {"api-version": VERSION}
    assert (
        listed[0]["headers"]["api-key"] == "***" and listed[0]["headers"]["authorization"] == "***"
    )
    assert listed[0]["json"] == ask("x")
    assert KEY not in json.dumps(listed)

    stats = json.loads((await control("GET", "/_emulator/stats")).body)
    assert stats == {
        "connections_accepted": 10,
        "requests": 5,
    }  # the simple client: one connection per request
    await control("POST", "/_emulator/faults", {"status": 500})
    assert (await control("DELETE", "/_emulator/requests")).code == 204
    assert json.loads((await control("GET", "/_emulator/requests")).body) == []
    assert (
        await chat(emulator, client, ask("x"))
    ).code == 500  # deleting requests keeps the faults


@pytest.mark.gen_test
async def test_keep_alive_requests_share_one_connection(emulator, keep_alive):
    for stream in (False, True, False):
        assert (
            await chat(emulator, keep_alive, ask("again", stream=stream), deployment="backup")
        ).code == 200
    assert emulator.connections_accepted == 1
    assert all(record.finished.is_set() for record in emulator.requests)
