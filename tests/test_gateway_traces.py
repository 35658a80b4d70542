"""Traces from the real gateway: a local OTLP/HTTP receiver, two emulators, the caller's trace.

tests/test_tracing.py checks the tracer on its own; this checks that the
pipeline makes the spans a request should have, and hands the trace on to Azure.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator import AzureEmulator, Fault

from .conftest import API_VERSION, EMULATOR_KEY, RunningGateway, free_port
from .support.deployments import write_deployments_file
from .support.metrics import sample, samples
from .support.otlp_receiver import EXPORT_AT_ONCE, OTLPReceiver, by_kind
from .support.sse import parse_events

CALLER_TRACE_ID = "5b8efff798038103d269b633813fc60c"
CALLER_SPAN_ID = "eee19b7ec3c1b174"
CALLER_TRACE = {
    "traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01",
    "tracestate": "caller=7f",
}
ALICE_KEY = "sk-alice-trace-5e1f"
PROMPT = "Tell me about the lighthouse keeper's secret"
# A is all but certain to be chosen first.
HEAVY, LIGHT = 1_000_000, 0.001


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as running:
        yield running


@pytest.fixture
def emulator_b(io_loop: Any) -> Iterator[AzureEmulator]:
    emu = AzureEmulator(key="key-b-trace", deployments=("gpt-4o-b",))
    io_loop.run_sync(lambda: emu.start("127.0.0.1", 0))
    yield emu
    io_loop.run_sync(emu.stop)


@pytest.fixture
def traced_gateway(
    tmp_path: Path, emulator: AzureEmulator, emulator_b: AzureEmulator, start_gateway: Callable
) -> Callable[..., RunningGateway]:
    """A gateway over A (preferred) and B, serving gpt-4o, with the key alice."""

    def start(**env: str) -> RunningGateway:
        path = write_deployments_file(
            tmp_path,
            [
                {
                    "name": "a",
                    "endpoint": emulator.url,
                    "deployment": "gpt-4o",
                    "api_version": API_VERSION,
                    "key": EMULATOR_KEY,
                    "weight": HEAVY,
                    "models": ["gpt-4o"],
                },
                {
                    "name": "b",
                    "endpoint": emulator_b.url,
                    "deployment": "gpt-4o-b",
                    "api_version": API_VERSION,
                    "key": "key-b-trace",
                    "weight": LIGHT,
                    "models": ["gpt-4o"],
                },
            ],
            [{"name": "alice", "key": ALICE_KEY}],
        )
        return start_gateway(DEPLOYMENTS_FILE=path, **env)

    return start


def streamed_chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": 40,
        "temperature": 0.3,
        **extra,
    }


def answer_of(body: bytes) -> tuple[str, dict[str, Any]]:
    """The streamed answer's text and its usage event."""
    text, usage = "", {}
    for event in parse_events(body):
        if event == b"[DONE]":
            continue
        chunk = json.loads(event)
        for choice in chunk.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
        usage = chunk.get("usage") or usage
    return text, usage


@pytest.mark.gen_test(timeout=30)
async def test_a_streamed_chat_with_one_failover_is_one_server_and_two_client_spans(
    receiver, traced_gateway, emulator, emulator_b
):
    gateway = traced_gateway(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, **EXPORT_AT_ONCE)
    emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "30000"}))
    response = await gateway.post(
        "/v1/chat/completions",
        streamed_chat(),
        headers={"Authorization": f"Bearer {ALICE_KEY}", **CALLER_TRACE},
    )
    assert response.code == 200
    assert response.headers["x-upstream-attempts"] == "2"
    assert response.headers["x-upstream-deployment"] == "b"
    text, usage = answer_of(response.body)
    assert text and usage["completion_tokens"] > 0

    spans = await receiver.spans_arrived(3)
    assert len(spans) == 3
    server, (failed, answered) = by_kind(spans)

    assert (server.trace_id, server.parent_span_id) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gateway.key.name": "alice",
        "gateway.request.id": response.headers["x-request-id"],
        "gateway.upstream.attempts": 2,
        "gateway.deployment": "b",
    }
    assert server.resource["service.name"] == "azure-gpt-api"

    for client in (failed, answered):
        assert (client.trace_id, client.parent_span_id) == (CALLER_TRACE_ID, server.span_id)
        assert client.name == "chat gpt-4o"
        assert client.attributes["gen_ai.operation.name"] == "chat"
        assert client.attributes["gen_ai.provider.name"] == "azure.ai.openai"
        assert client.attributes["gen_ai.system"] == "azure.ai.openai"
        assert client.attributes["gen_ai.request.model"] == "gpt-4o"
        assert client.attributes["gen_ai.request.max_tokens"] == 40
        assert client.attributes["gen_ai.request.temperature"] == 0.3
        assert client.attributes["gen_ai.request.stream"] is True
        assert client.attributes["openai.api.type"] == "chat_completions"
        assert client.attributes["server.address"] == "127.0.0.1"

    assert failed.attributes["gateway.deployment"] == "a"
    assert failed.attributes["gateway.attempt"] == 1
    assert failed.attributes["http.response.status_code"] == 429
    assert failed.attributes["gateway.failover.reason"] == failed.attributes["error.type"]
    assert failed.status == "STATUS_CODE_ERROR"
    assert failed.attributes["server.port"] == int(emulator.url.rsplit(":", 1)[1])

    assert answered.attributes["gateway.deployment"] == "b"
    assert answered.attributes["gateway.attempt"] == 2
    assert answered.attributes["http.response.status_code"] == 200
    assert answered.attributes["gen_ai.response.model"] == emulator_b.model
    assert answered.attributes["gen_ai.response.id"].startswith("chatcmpl")
    assert answered.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert answered.attributes["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert answered.attributes["gen_ai.usage.output_tokens"] == usage["completion_tokens"]
    assert "error.type" not in answered.attributes
    assert answered.status == "STATUS_CODE_UNSET"
    (first_token,) = answered.events
    assert first_token.name == "gateway.first_token"
    assert answered.start_ns <= first_token.time_ns <= answered.end_ns
    assert answered.attributes["gen_ai.response.time_to_first_chunk"] > 0

    # Each attempt carried its own span's context, in the caller's trace, to Azure.
    (to_a,) = emulator.requests
    (to_b,) = emulator_b.requests
    assert to_a.headers["traceparent"] == f"00-{CALLER_TRACE_ID}-{failed.span_id}-01"
    assert to_b.headers["traceparent"] == f"00-{CALLER_TRACE_ID}-{answered.span_id}-01"
    assert to_b.headers["tracestate"] == CALLER_TRACE["tracestate"]

    for span in spans:
        strings = span.all_strings()
        assert not [found for found in strings if PROMPT in found or text in found]
        assert ALICE_KEY not in " ".join(strings)


@pytest.mark.gen_test(timeout=30)
async def test_a_refused_request_is_a_server_span_without_attempts(receiver, traced_gateway):
    gateway = traced_gateway(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, **EXPORT_AT_ONCE)
    response = await gateway.post(
        "/v1/chat/completions", streamed_chat(temperature=7), headers={**CALLER_TRACE}
    )
    assert response.code == 401
    (server,) = await receiver.spans_arrived(1)
    assert server.kind == "SPAN_KIND_SERVER"
    assert server.parent_span_id == CALLER_SPAN_ID
    assert server.attributes["http.response.status_code"] == 401
    assert "gateway.upstream.attempts" not in server.attributes
    assert server.status == "STATUS_CODE_UNSET"  # a 4xx is the caller's, not the server's


@pytest.mark.gen_test(timeout=30)
async def test_tracing_off_hands_the_callers_trace_to_azure_unchanged(traced_gateway, emulator):
    gateway = traced_gateway()
    assert not gateway.server.pipeline.tracer.enabled
    response = await gateway.post(
        "/v1/chat/completions",
        streamed_chat(),
        headers={"Authorization": f"Bearer {ALICE_KEY}", **CALLER_TRACE},
    )
    assert response.code == 200
    (to_a,) = emulator.requests
    assert to_a.headers["traceparent"] == CALLER_TRACE["traceparent"]
    assert to_a.headers["tracestate"] == CALLER_TRACE["tracestate"]


@pytest.mark.gen_test(timeout=30)
async def test_with_the_collector_down_requests_are_answered_and_lost_spans_counted(
    traced_gateway,
):
    gateway = traced_gateway(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}",
        OTEL_EXPORTER_OTLP_TIMEOUT="500",
        **EXPORT_AT_ONCE,
    )
    headers = {"Authorization": f"Bearer {ALICE_KEY}", **CALLER_TRACE}
    for body in (streamed_chat(), streamed_chat(stream=False)):
        response = await gateway.post("/v1/chat/completions", body, headers=headers)
        assert response.code == 200
        assert response.headers["x-upstream-deployment"] == "a"
    pipeline = gateway.server.pipeline
    # The shutdown waits for the last export to fail (500 ms), so every loss is counted by then.
    assert await asyncio.to_thread(pipeline.tracer.shutdown, 10.0)
    found = samples(pipeline.metrics.render()[0])
    assert sample(found, "gateway_trace_spans_dropped_total") == 4  # 2 server + 2 client spans


@pytest.mark.gen_test(timeout=30)
async def test_a_hung_collector_holds_no_request(receiver, traced_gateway):
    gateway = traced_gateway(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, **EXPORT_AT_ONCE)
    headers = {"Authorization": f"Bearer {ALICE_KEY}"}
    receiver.hold()
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", streamed_chat(), headers=headers)
        assert response.code == 200
    receiver.release()
    spans = await receiver.spans_arrived(6)
    assert (
        sorted(span.kind for span in spans) == ["SPAN_KIND_CLIENT"] * 3 + ["SPAN_KIND_SERVER"] * 3
    )
