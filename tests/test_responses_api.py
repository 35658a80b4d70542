"""The Responses API through the gateway, with the official `openai` SDK as the client."""

from __future__ import annotations

import json
import logging

import openai
import pytest

from emulator import Fault

from .conftest import DEPLOYMENT, EMULATOR_KEY
from .support.deployments import write_deployments_file
from .support.loopback import ScriptedServer, ok, reply
from .support.metrics import sample, samples

PREVIEW = "2025-04-01-preview"
ONE_A_MINUTE = "one-request-a-minute-key-52"


@pytest.fixture
def v1_gateway(start_gateway):
    return start_gateway(API_VERSION="v1", MAX_ATTEMPTS="1")


def client_of(gateway, base: str = "/v1", key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + base, api_key=key, max_retries=0)


async def tokens_counted(gateway) -> tuple[float, float, dict]:
    """(prompt, completion) tokens in the metrics, and the usage report's entry."""
    metrics = samples((await gateway.get("/metrics")).body)
    labels = {"key": "anonymous", "deployment": DEPLOYMENT}
    prompt = sample(metrics, "gateway_tokens_total", kind="prompt", **labels)
    completion = sample(metrics, "gateway_tokens_total", kind="completion", **labels)
    report = json.loads((await gateway.get("/v1/usage")).body)["keys"]["anonymous"][DEPLOYMENT]
    return prompt, completion, report


@pytest.mark.gen_test
async def test_create_reaches_the_v1_path_and_counts_its_usage(v1_gateway):
    async with client_of(v1_gateway) as client:
        response = await client.responses.create(model=DEPLOYMENT, input="hello responses")
    assert response.output_text
    assert response.status == "completed"
    received = v1_gateway.emulator.requests[-1]
    assert received.path == "/openai/v1/responses"
    assert received.operation == "responses.create"
    assert received.json == {"model": DEPLOYMENT, "input": "hello responses"}
    assert received.headers["api-key"] == EMULATOR_KEY

    prompt, completion, report = await tokens_counted(v1_gateway)
    assert (prompt, completion) == (response.usage.input_tokens, response.usage.output_tokens)
    assert report == {
        "requests": 1,
        "prompt_tokens": response.usage.input_tokens,
        "completion_tokens": response.usage.output_tokens,
        "cost_usd": 0.0,  # the deployment has no price
    }


@pytest.mark.gen_test
async def test_a_stream_is_relayed_as_sent_without_stream_options(v1_gateway):
    async with client_of(v1_gateway) as client:
        whole = await client.responses.create(model=DEPLOYMENT, input="stream this answer")
        stream = await client.responses.create(
            model=DEPLOYMENT, input="stream this answer", stream=True
        )
        events = [event async for event in stream]
    received = v1_gateway.emulator.requests[-1]
    assert received.json == {"model": DEPLOYMENT, "input": "stream this answer", "stream": True}
    assert "stream_options" not in received.json
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))

    prompt, completion, report = await tokens_counted(v1_gateway)
    usage = events[-1].response.usage
    assert prompt == whole.usage.input_tokens + usage.input_tokens
    assert completion == whole.usage.output_tokens + usage.output_tokens
    assert report["requests"] == 2


@pytest.mark.gen_test
async def test_the_bytes_of_a_stream_are_azures(v1_gateway):
    response = await v1_gateway.post(
        "/v1/responses", {"model": DEPLOYMENT, "input": "bytes", "stream": True}
    )
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.body == v1_gateway.emulator.requests[-1].response_body
    assert b"[DONE]" not in response.body and response.body.startswith(b"event: ")


@pytest.mark.gen_test
async def test_the_stream_helper_gives_the_final_response(v1_gateway):
    client = client_of(v1_gateway, "/openai/v1/")
    async with client, client.responses.stream(model=DEPLOYMENT, input="helper") as stream:
        text = "".join([event.delta async for event in stream if event.type.endswith("delta")])
        final = await stream.get_final_response()
    assert final.output_text == text
    assert v1_gateway.emulator.requests[-1].path == "/openai/v1/responses"


@pytest.mark.gen_test
async def test_retrieve_input_items_delete_and_query_strings(v1_gateway):
    async with client_of(v1_gateway) as client:
        created = await client.responses.create(model=DEPLOYMENT, input="keep me")
        again = await client.responses.retrieve(
            created.id, include=["message.input_image.image_url"]
        )
        received = v1_gateway.emulator.requests[-1]
        assert received.path == f"/openai/v1/responses/{created.id}"
        assert received.method == "GET" and received.operation == "responses.retrieve"
        assert received.query == {"include[]": "message.input_image.image_url"}
        assert again.id == created.id and again.output_text == created.output_text

        items = await client.responses.input_items.list(created.id, limit=5, order="asc")
        assert v1_gateway.emulator.requests[-1].query == {"limit": "5", "order": "asc"}
        assert [item.content[0].text for item in items.data] == ["keep me"]

        await client.responses.delete(created.id)
        assert v1_gateway.emulator.requests[-1].operation == "responses.delete"
        with pytest.raises(openai.NotFoundError) as raised:
            await client.responses.retrieve(created.id)
    assert created.id in raised.value.message


@pytest.mark.gen_test
async def test_cancel_a_background_response(v1_gateway):
    v1_gateway.emulator.add_fault(Fault(hang=True))
    async with client_of(v1_gateway) as client:
        running = await client.responses.create(model=DEPLOYMENT, input="slow", background=True)
        assert running.status in ("queued", "in_progress")
        cancelled = await client.responses.cancel(running.id)
    assert cancelled.status == "cancelled"
    received = v1_gateway.emulator.requests[-1]
    assert received.path == f"/openai/v1/responses/{running.id}/cancel"
    assert received.method == "POST"


@pytest.mark.gen_test
async def test_an_unknown_response_id_is_a_404(v1_gateway):
    async with client_of(v1_gateway) as client:
        with pytest.raises(openai.NotFoundError) as raised:
            await client.responses.retrieve("resp_never_made")
    assert "resp_never_made" in raised.value.message


@pytest.mark.gen_test
async def test_a_cut_stream_ends_with_an_error_event_the_sdk_raises(v1_gateway):
    v1_gateway.emulator.add_fault(Fault(reset_after=4))
    async with client_of(v1_gateway) as client:
        stream = await client.responses.create(model=DEPLOYMENT, input="cut me off", stream=True)
        seen = []
        with pytest.raises(openai.APIError) as raised:
            async for event in stream:
                seen.append(event)
    assert len(seen) == 4
    assert "cut" in raised.value.message


@pytest.mark.gen_test
async def test_the_error_event_has_the_responses_shape(v1_gateway):
    v1_gateway.emulator.add_fault(Fault(reset_after=2))
    response = await v1_gateway.post(
        "/v1/responses", {"model": DEPLOYMENT, "input": "cut", "stream": True}
    )
    last = response.body.rstrip(b"\n").split(b"\n\n")[-1]
    name, data = last.split(b"\n")
    assert name == b"event: error"
    payload = json.loads(data.removeprefix(b"data: "))
    assert payload["type"] == "error"
    assert payload["sequence_number"] == 2
    assert payload["code"] == "stream_interrupted" == payload["error"]["code"]
    assert payload["message"] == payload["error"]["message"]


@pytest.mark.gen_test
async def test_azure_openai_client_on_a_dated_preview_deployment(start_gateway):
    gateway = start_gateway(API_VERSION=PREVIEW, MAX_ATTEMPTS="1")
    async with openai.AsyncAzureOpenAI(
        azure_endpoint=gateway.url, api_key="unused", api_version="2025-03-01-preview"
    ) as client:
        created = await client.responses.create(model=DEPLOYMENT, input="dated")
        received = gateway.emulator.requests[-1]
        assert received.path == "/openai/responses"
        assert received.query == {"api-version": PREVIEW}
        assert received.json["model"] == DEPLOYMENT
        again = await client.responses.retrieve(created.id)
    assert again.id == created.id
    assert gateway.emulator.requests[-1].path == f"/openai/responses/{created.id}"


@pytest.mark.gen_test
async def test_the_dated_azure_form_needs_an_api_version(start_gateway):
    gateway = start_gateway(API_VERSION="v1")
    response = await gateway.post("/openai/responses", {"model": DEPLOYMENT, "input": "x"})
    assert response.code == 404
    assert json.loads(response.body)["error"]["param"] == "api-version"


@pytest.mark.gen_test
async def test_a_bad_responses_body_is_our_400_in_the_openai_shape(v1_gateway):
    async with client_of(v1_gateway) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.responses.create(model=DEPLOYMENT, input="x", temperature=5)
    assert raised.value.body["param"] == "temperature"
    assert all(r.operation != "responses.create" for r in v1_gateway.emulator.requests)


@pytest.mark.gen_test
async def test_an_unknown_future_field_reaches_azure(v1_gateway):
    body = {"model": DEPLOYMENT, "input": "x", "a_field_from_next_year": {"on": True}}
    response = await v1_gateway.post("/openai/v1/responses", body)
    assert response.code == 200
    assert v1_gateway.emulator.requests[-1].json == body


@pytest.mark.gen_test
async def test_an_idle_stream_ends_with_an_error_event_the_sdk_raises(start_gateway):
    gateway = start_gateway(API_VERSION="v1", STREAM_IDLE_TIMEOUT="0.2")
    gateway.emulator.add_fault(Fault(chunk_gap=5))
    async with client_of(gateway) as client:
        stream = await client.responses.create(model=DEPLOYMENT, input="slow", stream=True)
        seen = []
        with pytest.raises(openai.APIError) as raised:
            async for event in stream:
                seen.append(event)
    assert [event.type for event in seen] == ["response.created"]
    assert raised.value.code == "stream_idle_timeout"


def access_lines(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "azure-gpt-api.access"]


@pytest.mark.gen_test
async def test_access_log_and_request_metrics_name_the_responses_routes(start_gateway, caplog):
    caplog.set_level(logging.INFO, logger="azure-gpt-api.access")
    gateway = start_gateway(API_VERSION="v1", LOG_FORMAT="json")
    async with client_of(gateway) as client:
        created = await client.responses.create(model=DEPLOYMENT, input="logged")
        stream = await client.responses.create(model=DEPLOYMENT, input="logged", stream=True)
        streamed = [event async for event in stream][-1].response
        await client.responses.retrieve(created.id)
        await client.responses.delete(created.id)
    lines = access_lines(caplog)
    assert [(line["route"], line["method"], line["status"]) for line in lines] == [
        ("responses", "POST", 200),
        ("responses", "POST", 200),
        ("responses_retrieve", "GET", 200),
        ("responses_delete", "DELETE", 200),
    ]
    assert (lines[0]["prompt_tokens"], lines[0]["completion_tokens"]) == (
        created.usage.input_tokens,
        created.usage.output_tokens,
    )
    assert lines[1]["completion_tokens"] == streamed.usage.output_tokens
    assert lines[1]["ttft_ms"] is not None
    assert all(line["deployment"] == DEPLOYMENT for line in lines)
    metrics = samples((await gateway.get("/metrics")).body)
    assert sample(metrics, "gateway_requests_total", route="responses", status="200") == 2
    assert sample(metrics, "gateway_requests_total", route="responses_delete", status="200") == 1


@pytest.mark.gen_test
async def test_keys_and_quotas_hold_for_responses(tmp_path, emulator, start_gateway):
    path = write_deployments_file(
        tmp_path,
        [
            {
                "name": DEPLOYMENT,
                "endpoint": emulator.url,
                "deployment": DEPLOYMENT,
                "api_version": "v1",
                "key": EMULATOR_KEY,
            }
        ],
        keys=[{"name": "once", "key": ONE_A_MINUTE, "rpm": 1}],
    )
    # One quota window for the whole test, whenever it runs.
    gateway = start_gateway(clock=lambda: 1_800_000_000.0, DEPLOYMENTS_FILE=path)
    async with client_of(gateway, key="wrong-key") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.responses.create(model=DEPLOYMENT, input="x")
        with pytest.raises(openai.AuthenticationError):
            await client.responses.retrieve("resp_1")
    assert emulator.requests == []
    async with client_of(gateway, key=ONE_A_MINUTE) as client:
        created = await client.responses.create(model=DEPLOYMENT, input="x")
        with pytest.raises(openai.RateLimitError) as raised:
            await client.responses.retrieve(created.id)
    headers = raised.value.response.headers
    assert int(headers["retry-after-ms"]) == int(headers["Retry-After"]) * 1000
    assert [r.operation for r in emulator.requests] == ["responses.create"]


def sse(kind: str, number: int, **fields) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": number, **fields})
    return f"event: {kind}\ndata: {data}\n\n".encode()


@pytest.mark.gen_test
async def test_a_background_stream_is_resumed_on_its_deployment(start_gateway):
    azure = ScriptedServer()
    await azure.start()
    try:
        stored = {"id": "resp_bg", "object": "response", "status": "in_progress"}
        azure.queue(ok(json.dumps(stored).encode(), "Content-Type: application/json"))
        final = stored | {"status": "completed", "usage": {"input_tokens": 3, "output_tokens": 2}}
        events = [
            sse("response.output_text.delta", 4, item_id="m", output_index=0, content_index=0,
                delta="lo", logprobs=[]),
            sse("response.completed", 5, response=final),
        ]  # fmt: skip
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n"
        azure.queue(reply(head + b"".join(events)), close=True)
        gateway = start_gateway(ENDPOINT=azure.url, API_VERSION="v1")
        async with client_of(gateway) as client:
            stream = await client.responses.retrieve("resp_bg", stream=True, starting_after=3)
            seen = [event async for event in stream]
    finally:
        await azure.stop()
    assert [event.type for event in seen] == ["response.output_text.delta", "response.completed"]
    lookup, resumed = (request.split(b"\r\n", 1)[0] for request in azure.requests)
    assert lookup == b"GET /openai/v1/responses/resp_bg HTTP/1.1"
    path, query = resumed.removesuffix(b" HTTP/1.1").split(b"?")
    assert path == b"GET /openai/v1/responses/resp_bg"
    assert sorted(query.split(b"&")) == [b"starting_after=3", b"stream=true"]
    assert await gateway.server.pipeline.affinity.owner("resp_bg") == DEPLOYMENT
