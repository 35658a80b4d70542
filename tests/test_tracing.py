"""Traces: what a collector receives for a request with a failover, and what tracing off costs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from gateway.errors import ConfigError
from gateway.ops.tracing import (
    EXPORTER_LOGGERS,
    NO_ATTEMPT,
    NO_REQUEST,
    ForwardedTrace,
    OneLinePerInterval,
    OpenTelemetryTracer,
    Tracer,
    load_tracing_settings,
    start_tracing,
)

from .conftest import free_port
from .support.otlp_receiver import EXPORT_AT_ONCE, OTLPReceiver, by_kind

CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN_ID = "00f067aa0ba902b7"
CALLER_HEADERS = {
    "traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-01",
    "tracestate": "congo=t61rcWkgMzE",
}
PROMPT = "the secret prompt text"
ANSWER = "the private completion text"


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as running:
        yield running


class Drops:
    """An `on_dropped` callback, as a metric would be, that a test can wait on."""

    def __init__(self) -> None:
        self.total = 0
        self._changed = threading.Condition()

    def __call__(self, count: int) -> None:
        with self._changed:
            self.total += count
            self._changed.notify_all()

    def wait_for(self, total: int, timeout: float = 10.0) -> None:
        with self._changed:
            if not self._changed.wait_for(lambda: self.total >= total, timeout):
                raise AssertionError(f"{self.total} spans counted as dropped, not {total}")


@pytest.fixture
def start():
    """Start tracers from environment mappings; each is shut down after the test."""
    started: list[Tracer] = []

    def build(environ: dict[str, str], drops: Drops | None = None) -> Tracer:
        tracer = start_tracing(load_tracing_settings(environ), on_dropped=drops or Drops())
        started.append(tracer)
        return tracer

    yield build
    for tracer in started:
        tracer.shutdown()


def traced_request_with_failover(tracer: Tracer) -> dict[str, str]:
    """What the pipeline does for a streamed chat whose first deployment answers 429."""
    request = tracer.request("POST", "/v1/chat/completions", CALLER_HEADERS)
    request.set_request(
        operation="chat",
        model="gpt-4o",
        api="chat_completions",
        max_tokens=64,
        temperature=0.2,
        stream=True,
    )
    request.set_key("alice")
    request.set_request_id("req-42")
    request.record_input([{"role": "user", "content": PROMPT}])

    first = request.attempt("eastus", 1, endpoint="https://eastus.example.azure.com")
    injected = first.inject()
    first.failed("rate_limited", status=429, failover=True)
    first.end(429)

    second = request.attempt("westeurope", 2, endpoint="https://westeurope.example.azure.com")
    second.set_upstream_request_id("apim-7")
    second.first_token()
    second.record_output(ANSWER, "stop")
    second.set_response(
        model="gpt-4o-2024-08-06",
        response_id="chatcmpl-9",
        finish_reasons=["stop"],
        input_tokens=12,
        output_tokens=7,
    )
    second.end(200)
    request.end(200)
    return injected


def test_a_request_with_one_failover_is_one_server_span_and_two_client_spans(receiver, start):
    tracer = start(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_SERVICE_NAME": "gateway-under-test",
            "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment.name=test",
            **EXPORT_AT_ONCE,
        }
    )
    injected = traced_request_with_failover(tracer)
    spans = receiver.wait_for_spans(3)
    assert len(spans) == 3
    server, (failed, answered) = by_kind(spans)

    assert server.resource["service.name"] == "gateway-under-test"
    assert server.resource["deployment.environment.name"] == "test"
    assert (server.trace_id, server.parent_span_id) == (CALLER_TRACE_ID, CALLER_SPAN_ID)
    assert server.name == "POST /v1/chat/completions"
    assert server.attributes == {
        "http.request.method": "POST",
        "http.route": "/v1/chat/completions",
        "http.response.status_code": 200,
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "gpt-4o",
        "gateway.key.name": "alice",
        "gateway.request.id": "req-42",
        "gateway.upstream.attempts": 2,
        "gateway.deployment": "westeurope",
    }
    assert server.status == "STATUS_CODE_UNSET"

    for client in (failed, answered):
        assert client.trace_id == CALLER_TRACE_ID
        assert client.parent_span_id == server.span_id
        assert client.name == "chat gpt-4o"
        assert client.attributes["gen_ai.provider.name"] == "azure.ai.openai"
        assert client.attributes["gen_ai.system"] == "azure.ai.openai"
        assert client.attributes["gen_ai.request.max_tokens"] == 64
        assert client.attributes["gen_ai.request.temperature"] == 0.2
        assert client.attributes["gen_ai.request.stream"] is True
        assert client.attributes["openai.api.type"] == "chat_completions"
        assert client.attributes["server.port"] == 443

    assert failed.attributes["gateway.deployment"] == "eastus"
    assert failed.attributes["server.address"] == "eastus.example.azure.com"
    assert failed.attributes["gateway.failover.reason"] == "rate_limited"
    assert failed.attributes["error.type"] == "rate_limited"
    assert failed.attributes["http.response.status_code"] == 429
    assert (failed.status, failed.status_message) == ("STATUS_CODE_ERROR", "rate_limited")

    assert answered.attributes["gateway.deployment"] == "westeurope"
    assert answered.attributes["gateway.attempt"] == 2
    assert answered.attributes["gateway.upstream.request_id"] == "apim-7"
    assert answered.attributes["gen_ai.response.model"] == "gpt-4o-2024-08-06"
    assert answered.attributes["gen_ai.response.id"] == "chatcmpl-9"
    assert answered.attributes["gen_ai.response.finish_reasons"] == ["stop"]
    assert answered.attributes["gen_ai.usage.input_tokens"] == 12
    assert answered.attributes["gen_ai.usage.output_tokens"] == 7
    assert answered.attributes["http.response.status_code"] == 200
    assert "error.type" not in answered.attributes and "gateway.failover.reason" not in (
        answered.attributes
    )
    assert answered.status == "STATUS_CODE_UNSET"
    (first_token,) = answered.events
    assert first_token.name == "gateway.first_token"
    assert answered.start_ns <= first_token.time_ns <= answered.end_ns
    ttft = answered.attributes["gen_ai.response.time_to_first_chunk"]
    assert ttft == pytest.approx((first_token.time_ns - answered.start_ns) / 1e9)

    # Azure gets the first attempt's own context, in the caller's trace and state.
    assert injected == {
        "traceparent": f"00-{CALLER_TRACE_ID}-{failed.span_id}-01",
        "tracestate": CALLER_HEADERS["tracestate"],
    }
    for span in spans:
        assert not [text for text in span.all_strings() if PROMPT in text or ANSWER in text]
        assert "gen_ai.input.messages" not in span.attributes


def test_content_capture_is_a_switch_that_records_prompt_and_answer(receiver, start):
    tracer = start(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint + "/v1/traces",
            "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true",
            **EXPORT_AT_ONCE,
        }
    )
    traced_request_with_failover(tracer)
    server, (failed, answered) = by_kind(receiver.wait_for_spans(3))
    for client in (failed, answered):
        assert client.attributes["gen_ai.input.messages"] == (
            '[{"role": "user", "parts": [{"type": "text", "content": "the secret prompt text"}]}]'
        )
    assert answered.attributes["gen_ai.output.messages"] == (
        '[{"role": "assistant", "parts": [{"type": "text", "content": '
        '"the private completion text"}], "finish_reason": "stop"}]'
    )
    assert PROMPT not in " ".join(server.all_strings())


def test_without_an_endpoint_tracing_is_off_and_makes_nothing_per_request():
    threads = threading.active_count()
    for environ in (
        {},
        {"OTEL_SERVICE_NAME": "x"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_SDK_DISABLED": "true"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"},
    ):
        settings = load_tracing_settings(environ)
        tracer = start_tracing(settings)
        assert not settings.enabled and not tracer.enabled
        assert not isinstance(tracer, OpenTelemetryTracer)
        request = tracer.request("POST", "/v1/chat/completions", {"x-request-id": "r"})
        assert request is NO_REQUEST
        assert tracer.request("GET", "/v1/models", {}) is NO_REQUEST
        request.set_request(operation="chat", model="gpt-4o")
        request.set_key("alice")
        request.record_input([{"role": "user", "content": PROMPT}])
        attempt = request.attempt("eastus", 1, endpoint="https://eastus.example.azure.com")
        assert attempt is NO_ATTEMPT
        assert attempt.inject() == {}
        attempt.first_token()
        attempt.set_response(model="m", input_tokens=1)
        attempt.failed("rate_limited", status=429, failover=True)
        attempt.end(429)
        request.end(200)
        assert tracer.shutdown() is True
    assert threading.active_count() == threads


def test_tracing_off_hands_the_callers_trace_context_to_azure_unchanged():
    tracer = start_tracing(load_tracing_settings({}))
    request = tracer.request("POST", "/v1/chat/completions", CALLER_HEADERS)
    assert isinstance(request, ForwardedTrace)
    assert request.attempt("eastus", 1).inject() == CALLER_HEADERS
    assert request.attempt("westeurope", 2).inject() == CALLER_HEADERS
    malformed = {"traceparent": "00-not-a-trace-01"}
    assert tracer.request("POST", "/v1/chat/completions", malformed) is NO_REQUEST


def test_an_unsampled_caller_trace_is_not_exported_but_still_propagated(receiver, start):
    tracer = start({"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, **EXPORT_AT_ONCE})
    unsampled = {"traceparent": f"00-{CALLER_TRACE_ID}-{CALLER_SPAN_ID}-00"}
    request = tracer.request("POST", "/unsampled", unsampled)
    attempt = request.attempt("eastus", 1)
    injected = attempt.inject()["traceparent"]
    assert injected.startswith(f"00-{CALLER_TRACE_ID}-") and injected.endswith("-00")
    attempt.end(200)
    request.end(200)
    # Spans leave in the order they ended: once a later sampled trace's arrive,
    # the unsampled ones would have arrived before them.
    traced_request_with_failover(tracer)
    spans = receiver.wait_for_spans(3)
    assert len(spans) == 3
    assert {span.trace_id for span in spans} == {CALLER_TRACE_ID}
    assert "POST /unsampled" not in [span.name for span in spans]


def test_with_the_collector_down_calls_return_and_lost_spans_are_counted(start):
    drops = Drops()
    tracer = start(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "200",
            **EXPORT_AT_ONCE,
        },
        drops,
    )
    traced_request_with_failover(tracer)
    drops.wait_for(3)
    assert drops.total == 3
    assert tracer.shutdown(timeout=5.0) is True


def test_a_hung_collector_never_holds_a_request_and_overflow_is_counted(receiver, start):
    """Queue of 4, batches of 2: while the collector holds the first batch, eight
    more spans end at once; four wait in the queue, four are pushed out."""
    drops = Drops()
    tracer = start(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_MAX_QUEUE_SIZE": "4",
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "2",
            # Only a full batch starts an export, so the test decides when.
            "OTEL_BSP_SCHEDULE_DELAY": "600000",
        },
        drops,
    )
    receiver.hold()
    for number in (1, 2):
        tracer.request("GET", f"/first/{number}", {}).end(200)
    receiver.wait_for_requests(1)
    for number in range(8):
        tracer.request("GET", f"/later/{number}", {}).end(200)
    assert drops.total == 4
    receiver.release()
    spans = receiver.wait_for_spans(6)
    assert sorted(span.name for span in spans) == [
        "GET /first/1",
        "GET /first/2",
        "GET /later/4",
        "GET /later/5",
        "GET /later/6",
        "GET /later/7",
    ]
    assert drops.total == 4


def test_shutdown_sends_what_is_still_queued(receiver):
    tracer = start_tracing(
        load_tracing_settings(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "600000"}
        )
    )
    tracer.request("GET", "/v1/models", {}).end(200)
    assert receiver.spans == []
    assert tracer.shutdown(timeout=5.0) is True
    assert [span.name for span in receiver.wait_for_spans(1)] == ["GET /v1/models"]


def test_shutdown_with_a_hung_collector_returns_after_its_timeout(receiver):
    tracer = start_tracing(
        load_tracing_settings(
            {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "10"}
        )
    )
    receiver.hold()
    tracer.request("GET", "/v1/models", {}).end(200)
    receiver.wait_for_requests(1)
    assert tracer.shutdown(timeout=0.2) is False
    receiver.release()


WRONG_VARIABLES = [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT: must be"),
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "OTEL_EXPORTER_OTLP_PROTOCOL: only http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT: must be"),
    ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION: must be gzip"),
    ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS: each entry must"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER: must be one of always_on"),
    (
        {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
        "OTEL_TRACES_SAMPLER_ARG: must be a number from 0 to 1",
    ),
    ({"OTEL_TRACES_EXPORTER": "jaeger"}, "OTEL_TRACES_EXPORTER: must be otlp or none"),
    (
        {"OTEL_BSP_MAX_QUEUE_SIZE": "8", "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "9"},
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must be at most OTEL_BSP_MAX_QUEUE_SIZE (8)",
    ),
    ({"OTEL_BSP_SCHEDULE_DELAY": "0"}, "OTEL_BSP_SCHEDULE_DELAY: must be a whole number"),
    ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED: must be true or false"),
]


@pytest.mark.parametrize(("environ", "problem"), WRONG_VARIABLES)
def test_a_wrong_variable_is_named_with_its_rule(environ, problem):
    with pytest.raises(ConfigError) as raised:
        load_tracing_settings(environ)
    assert len(raised.value.problems) == 1
    assert raised.value.problems[0].startswith(problem)


def test_settings_take_the_signal_specific_variable_and_keep_headers_secret():
    settings = load_tracing_settings(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4318/",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://traces.example:4318/custom",
            "OTEL_EXPORTER_OTLP_HEADERS": "api-key=general",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "api-key=s%3Dcret,x-team=ai",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "2500",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.25",
        }
    )
    assert settings.endpoint == "https://traces.example:4318/custom"
    assert [(name, value.reveal()) for name, value in settings.headers] == [
        ("api-key", "s=cret"),
        ("x-team", "ai"),
    ]
    assert "s=cret" not in repr(settings)
    assert settings.export_timeout == 2.5
    assert (settings.sampler, settings.sampler_ratio) == ("parentbased_traceidratio", 0.25)
    general = load_tracing_settings({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://general:4318/"})
    assert general.endpoint == "http://general:4318/v1/traces"


def test_exporter_logs_are_held_to_one_line_per_interval(start):
    start({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"})
    for name in EXPORTER_LOGGERS:
        assert any(isinstance(f, OneLinePerInterval) for f in logging.getLogger(name).filters)

    now = [100.0]
    quiet = OneLinePerInterval(60.0, clock=lambda: now[0])

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord("exporter", logging.WARNING, __file__, 1, message, None, None)

    assert quiet.filter(record("Failed to export batch"))
    now[0] += 30
    assert not quiet.filter(record("Failed to export batch"))
    assert not quiet.filter(record("Transient error, retrying"))
    now[0] += 31
    passed = record("Failed to export %s")
    passed.args = ("spans",)
    assert quiet.filter(passed)
    assert passed.getMessage() == "Failed to export spans (2 similar lines held back)"
