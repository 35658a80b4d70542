"""OpenTelemetry traces: a server span per request, a client span per upstream attempt.

A request's trace joins the caller's: its W3C `traceparent`/`tracestate` become
the server span's parent, and each attempt's `inject()` gives the headers that
carry the trace on to Azure. Attempt spans follow the GenAI semantic
conventions (`gen_ai.*`, provider `azure.ai.openai`; the deprecated
`gen_ai.system` is set too, for backends that still read it); what only this
gateway knows is under `gateway.*`.

Configuration is the standard OpenTelemetry variables, read by
`load_tracing_settings` from the mapping it is given:

- `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (used as is) or `OTEL_EXPORTER_OTLP_ENDPOINT`
  (`/v1/traces` appended). Neither set, `OTEL_TRACES_EXPORTER=none` or
  `OTEL_SDK_DISABLED=true`: tracing is off.
- `..._PROTOCOL` must be `http/protobuf` (the only exporter installed);
  `..._HEADERS`, `..._TIMEOUT` (milliseconds, as the specification says; the
  Python SDK alone reads seconds), `..._COMPRESSION` (`gzip` or `none`),
  `..._CERTIFICATE`; each `OTEL_EXPORTER_OTLP_TRACES_*` wins over its
  `OTEL_EXPORTER_OTLP_*`.
- `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and
  `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_MAX_QUEUE_SIZE`, `OTEL_BSP_SCHEDULE_DELAY`,
  `OTEL_BSP_MAX_EXPORT_BATCH_SIZE`.
- `OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true` records prompts and
  answers on the attempt spans (`gen_ai.input.messages`, `gen_ai.output.messages`).
  SENSITIVE: whoever can read the traces then reads every conversation. Off by
  default, and then no prompt or completion text is in any span.

Off costs next to nothing: `Tracer.request` returns one shared object whose
methods do nothing, or, when the caller sent a `traceparent`, a small object
that hands it on to Azure unchanged (as an intermediary that does not trace
should).

On, spans go through a batch processor with a bounded queue to a background
thread that exports them, so a request never waits for the collector. Spans
that are lost (the queue was full, the collector refused or could not be
reached) are reported through `on_dropped(count)`, from the request's thread
or the exporter's, so a metric can count them.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from time import time_ns
from typing import Any
from urllib.parse import unquote, urlsplit

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.version import __version__ as SDK_VERSION
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.errors import ConfigError
from gateway.secret import Secret

DEFAULT_SERVICE_NAME = "azure-gpt-api"
DEFAULT_EXPORT_TIMEOUT_MS = 10_000
DEFAULT_SAMPLER = "parentbased_always_on"
DEFAULT_MAX_QUEUE_SIZE = 2048
DEFAULT_SCHEDULE_DELAY_MS = 5000
DEFAULT_MAX_EXPORT_BATCH_SIZE = 512
# How long `shutdown` waits for the last spans to leave: a collector that is
# down must not hold up a restart.
DEFAULT_SHUTDOWN_TIMEOUT = 2.0
# The exporter logs every batch it could not send, and every retry: with the
# collector down, a line every few seconds. The drops are counted
# (`on_dropped`), so one line per interval is enough to say it is happening.
EXPORT_LOG_INTERVAL = 60.0
EXPORTER_LOGGERS = (
    "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "opentelemetry.exporter.otlp.common.http",
)
TRACES_PATH = "v1/traces"
PROVIDER_NAME = "azure.ai.openai"
INSTRUMENTATION_NAME = "azure-gpt-api"

SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)

# GenAI semantic conventions (the semantic-conventions-genai registry).
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
OPENAI_API_TYPE = "openai.api.type"
# General and HTTP semantic conventions.
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
HTTP_REQUEST_METHOD = "http.request.method"
HTTP_ROUTE = "http.route"
HTTP_RESPONSE_STATUS_CODE = "http.response.status_code"
# This gateway's own.
GATEWAY_KEY_NAME = "gateway.key.name"
GATEWAY_REQUEST_ID = "gateway.request.id"
GATEWAY_DEPLOYMENT = "gateway.deployment"
GATEWAY_ATTEMPT = "gateway.attempt"
GATEWAY_UPSTREAM_ATTEMPTS = "gateway.upstream.attempts"
GATEWAY_UPSTREAM_REQUEST_ID = "gateway.upstream.request_id"
GATEWAY_FAILOVER_REASON = "gateway.failover.reason"
FIRST_TOKEN_EVENT = "gateway.first_token"

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_PROPAGATOR = TraceContextTextMapPropagator()


@dataclass(frozen=True)
class TracingSettings:
    """What `load_tracing_settings` read; `endpoint` None means tracing is off."""

    endpoint: str | None = None
    service_name: str = DEFAULT_SERVICE_NAME
    resource_attributes: tuple[tuple[str, str], ...] = ()
    headers: tuple[tuple[str, Secret], ...] = ()
    export_timeout: float = DEFAULT_EXPORT_TIMEOUT_MS / 1000
    compression: str = "none"
    certificate_file: str | None = None
    sampler: str = DEFAULT_SAMPLER
    sampler_ratio: float = 1.0
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE
    schedule_delay: float = DEFAULT_SCHEDULE_DELAY_MS / 1000
    max_export_batch_size: int = DEFAULT_MAX_EXPORT_BATCH_SIZE
    capture_content: bool = False

    @property
    def enabled(self) -> bool:
        return self.endpoint is not None


def _signal_variable(environ: Mapping[str, str], suffix: str) -> tuple[str, str | None]:
    """`OTEL_EXPORTER_OTLP_TRACES_<suffix>` if set, else `OTEL_EXPORTER_OTLP_<suffix>`."""
    for name in (f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", f"OTEL_EXPORTER_OTLP_{suffix}"):
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return f"OTEL_EXPORTER_OTLP_TRACES_{suffix}", None


def _boolean(environ: Mapping[str, str], name: str, problems: list[str]) -> bool:
    raw = environ.get(name, "").strip().lower()
    if raw not in ("", "true", "false"):
        problems.append(f"{name}: must be true or false, not {raw!r}")
    return raw == "true"


def _whole_number(raw: str | None, name: str, default: int, problems: list[str]) -> int:
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        problems.append(f"{name}: must be a whole number of at least 1, not {raw!r}")
        return default
    return int(raw)


def _whole_number_variable(
    environ: Mapping[str, str], name: str, default: int, problems: list[str]
) -> int:
    return _whole_number(environ.get(name, "").strip(), name, default, problems)


def _key_value_list(raw: str, name: str, problems: list[str]) -> list[tuple[str, str]]:
    """`k1=v1,k2=v2` with percent-encoded values, as the OTLP variables write them."""
    pairs = []
    for item in raw.split(","):
        if not item.strip():
            continue
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            problems.append(f"{name}: each entry must be key=value, separated by commas")
            continue
        pairs.append((unquote(key.strip()), unquote(value.strip())))
    return pairs


def _traces_endpoint(environ: Mapping[str, str], problems: list[str]) -> str | None:
    specific = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    general = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if specific:
        name, endpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", specific
    elif general:
        name, endpoint = "OTEL_EXPORTER_OTLP_ENDPOINT", general.rstrip("/") + "/" + TRACES_PATH
    else:
        return None
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{name}: must be an http:// or https:// URL, not {endpoint!r}")
        return None
    return endpoint


def load_tracing_settings(environ: Mapping[str, str]) -> TracingSettings:
    """The tracing settings in `environ`, or ConfigError naming every wrong variable."""
    problems: list[str] = []
    disabled = _boolean(environ, "OTEL_SDK_DISABLED", problems)
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter not in ("otlp", "none"):
        problems.append(f"OTEL_TRACES_EXPORTER: must be otlp or none, not {exporter!r}")
    endpoint = _traces_endpoint(environ, problems)

    protocol_variable, protocol = _signal_variable(environ, "PROTOCOL")
    if protocol not in (None, "http/protobuf"):
        problems.append(
            f"{protocol_variable}: only http/protobuf is supported (the OTLP/HTTP exporter), "
            f"not {protocol!r}"
        )
    headers_variable, raw_headers = _signal_variable(environ, "HEADERS")
    headers = _key_value_list(raw_headers or "", headers_variable, problems)
    timeout_variable, raw_timeout = _signal_variable(environ, "TIMEOUT")
    timeout_ms = _whole_number(raw_timeout, timeout_variable, DEFAULT_EXPORT_TIMEOUT_MS, problems)
    compression_variable, compression = _signal_variable(environ, "COMPRESSION")
    if compression not in (None, "gzip", "none"):
        problems.append(f"{compression_variable}: must be gzip or none, not {compression!r}")
    _certificate_variable, certificate = _signal_variable(environ, "CERTIFICATE")

    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        problems.append(
            f"OTEL_TRACES_SAMPLER: must be one of {', '.join(SAMPLERS)}, not {sampler!r}"
        )
    ratio = 1.0
    raw_ratio = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if raw_ratio and sampler.endswith("traceidratio"):
        try:
            ratio = float(raw_ratio)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            problems.append(
                f"OTEL_TRACES_SAMPLER_ARG: must be a number from 0 to 1, not {raw_ratio!r}"
            )

    queue_size = _whole_number_variable(
        environ, "OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_MAX_QUEUE_SIZE, problems
    )
    batch_size = _whole_number_variable(
        environ,
        "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
        min(DEFAULT_MAX_EXPORT_BATCH_SIZE, queue_size),
        problems,
    )
    if batch_size > queue_size:
        problems.append(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE: must be at most "
            f"OTEL_BSP_MAX_QUEUE_SIZE ({queue_size})"
        )
    delay_ms = _whole_number_variable(
        environ, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS, problems
    )
    resource = _key_value_list(
        environ.get("OTEL_RESOURCE_ATTRIBUTES", ""), "OTEL_RESOURCE_ATTRIBUTES", problems
    )
    capture = _boolean(environ, "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT", problems)
    if problems:
        raise ConfigError(problems)
    return TracingSettings(
        endpoint=None if disabled or exporter == "none" else endpoint,
        service_name=environ.get("OTEL_SERVICE_NAME", "").strip() or DEFAULT_SERVICE_NAME,
        resource_attributes=tuple(resource),
        headers=tuple((key, Secret(value)) for key, value in headers),
        export_timeout=timeout_ms / 1000,
        compression=compression or "none",
        certificate_file=certificate,
        sampler=sampler,
        sampler_ratio=ratio,
        max_queue_size=queue_size,
        schedule_delay=delay_ms / 1000,
        max_export_batch_size=batch_size,
        capture_content=capture,
    )


def build_sampler(name: str, ratio: float) -> Sampler:
    """The sampler `OTEL_TRACES_SAMPLER` names, as the specification defines each."""
    root = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
    }
    if name.startswith("parentbased_"):
        return ParentBased(root[name.removeprefix("parentbased_")])
    return root[name]


def _present(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in attributes.items() if value is not None}


# --- tracing off -------------------------------------------------------------


class AttemptTrace:
    """One upstream attempt. This base does nothing: it is what tracing off hands out."""

    __slots__ = ()
    # False: nothing is recorded, so there is no need to read the answer for it.
    recording = False

    @property
    def captures_content(self) -> bool:
        """True when the answer's text is wanted (`record_output`)."""
        return False

    def inject(self) -> dict[str, str]:
        """The `traceparent`/`tracestate` headers to send to Azure with this attempt."""
        return {}

    def first_token(self) -> None:
        """The first token (or chunk) of the answer arrived."""

    def set_upstream_request_id(self, request_id: str | None) -> None:
        """Azure's `apim-request-id`, to find the call in Azure's own logs."""

    def set_response(
        self,
        *,
        model: str | None = None,
        response_id: str | None = None,
        finish_reasons: Sequence[str] | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        """What Azure's answer says about itself; a stream reveals each part in its time."""

    def record_output(self, text: str, finish_reason: str | None = None) -> None:
        """The answer's text, recorded only when content capture is switched on."""

    def failed(self, reason: str, *, status: int | None = None, failover: bool = False) -> None:
        """The attempt failed with `reason` (an error code); `failover`: another one follows."""

    def end(self, status: int | None = None) -> None:
        """The attempt is over; `status` is Azure's HTTP status if one came."""


class RequestTrace:
    """One request through the gateway. This base does nothing: it is what tracing off hands out."""

    __slots__ = ()
    # False: nothing is recorded, so there is no need to describe the request.
    recording = False

    def set_request(
        self,
        *,
        operation: str,
        model: str | None = None,
        api: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool | None = None,
    ) -> None:
        """What the caller asked for: `operation` is `chat` or `embeddings`, `api` is
        `chat_completions` or `responses` (Responses is a chat operation in the conventions)."""

    def set_key(self, name: str | None) -> None:
        """The caller key's name (never the key)."""

    def set_request_id(self, request_id: str | None) -> None:
        """The `x-request-id` the caller gets."""

    def record_input(self, messages: Sequence[Mapping[str, Any]]) -> None:
        """The prompt, recorded on each attempt only when content capture is switched on."""

    def attempt(self, deployment: str, number: int, *, endpoint: str | None = None) -> AttemptTrace:
        """Start attempt `number` (from 1) at `deployment`, whose base URL is `endpoint`."""
        return NO_ATTEMPT

    def end(self, status: int, *, error_type: str | None = None) -> None:
        """The gateway answered with `status`; `error_type` is the error code if it failed."""


NO_ATTEMPT = AttemptTrace()
NO_REQUEST = RequestTrace()


class _ForwardedAttempt(AttemptTrace):
    __slots__ = ("_headers",)

    def __init__(self, headers: dict[str, str]) -> None:
        self._headers = headers

    def inject(self) -> dict[str, str]:
        return dict(self._headers)


class ForwardedTrace(RequestTrace):
    """Tracing off, but the caller sent a trace context: hand it to Azure unchanged."""

    __slots__ = ("_attempt",)

    def __init__(self, headers: dict[str, str]) -> None:
        self._attempt = _ForwardedAttempt(headers)

    def attempt(self, deployment: str, number: int, *, endpoint: str | None = None) -> AttemptTrace:
        return self._attempt


class Tracer:
    """Hands out a trace per request. This base is tracing off; see `start_tracing`."""

    enabled = False

    def request(self, method: str, route: str, headers: Mapping[str, str]) -> RequestTrace:
        """The trace of one request. `route` is the route's template (low cardinality),
        `headers` a case-insensitive mapping of the caller's headers (Tornado's HTTPHeaders)."""
        traceparent = headers.get("traceparent")
        if traceparent is None or not _TRACEPARENT.match(traceparent.strip()):
            return NO_REQUEST
        forwarded = {"traceparent": traceparent.strip()}
        tracestate = headers.get("tracestate")
        if tracestate:
            forwarded["tracestate"] = tracestate
        return ForwardedTrace(forwarded)

    def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Send what is still queued, waiting at most `timeout` seconds; True if all left."""
        return True


# --- tracing on --------------------------------------------------------------


class _QueueAccount:
    """How many spans wait in the batch queue, to see the ones it pushes out when full.

    The SDK's queue drops its oldest span when a new one arrives and it is
    full, and says so only in a log line. Counting spans in (`on_end`) and out
    (`export`, which gets them just after the queue lets them go) sees each
    such drop. Between the SDK taking a batch and handing it to `export`, a
    full queue can look full a moment longer: the count may then exceed the
    real drops by up to one batch.
    """

    def __init__(self, capacity: int, on_dropped: Callable[[int], None]) -> None:
        self._capacity = capacity
        self._on_dropped = on_dropped
        self._waiting = 0
        self._lock = threading.Lock()

    def entered(self) -> None:
        with self._lock:
            full = self._waiting >= self._capacity
            if not full:
                self._waiting += 1
        if full:
            self.dropped(1)

    def dropped(self, count: int) -> None:
        self._on_dropped(count)

    def left(self, count: int) -> None:
        with self._lock:
            self._waiting = max(0, self._waiting - count)


class _CountingExporter(SpanExporter):
    """The OTLP exporter, reporting each batch it loses."""

    def __init__(self, exporter: SpanExporter, account: _QueueAccount) -> None:
        self._exporter = exporter
        self._account = account

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self._account.left(len(spans))
        result = self._exporter.export(spans)
        if result is not SpanExportResult.SUCCESS:
            self._account.dropped(len(spans))
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _CountingBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, counting spans into its queue and those ended after shutdown."""

    def __init__(
        self, exporter: SpanExporter, account: _QueueAccount, settings: TracingSettings
    ) -> None:
        super().__init__(
            exporter,
            max_queue_size=settings.max_queue_size,
            schedule_delay_millis=settings.schedule_delay * 1000,
            max_export_batch_size=settings.max_export_batch_size,
            export_timeout_millis=settings.export_timeout * 1000,
        )
        self._account = account
        self._closed = False

    def on_end(self, span: ReadableSpan) -> None:
        if span.context is None or not span.context.trace_flags.sampled:
            return
        if self._closed:
            self._account.dropped(1)
            return
        self._account.entered()
        super().on_end(span)

    def shutdown(self) -> None:
        self._closed = True
        super().shutdown()


class _RecordingAttempt(AttemptTrace):
    __slots__ = ("_span", "_started", "_capture", "_failed", "_ended")
    recording = True

    @property
    def captures_content(self) -> bool:
        return self._capture

    def __init__(self, span: trace.Span, started: int, capture: bool) -> None:
        self._span = span
        self._started = started
        self._capture = capture
        self._failed = False
        self._ended = False

    def inject(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier

    def first_token(self) -> None:
        now = time_ns()
        self._span.set_attribute(GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, (now - self._started) / 1e9)
        self._span.add_event(FIRST_TOKEN_EVENT, timestamp=now)

    def set_upstream_request_id(self, request_id: str | None) -> None:
        if request_id:
            self._span.set_attribute(GATEWAY_UPSTREAM_REQUEST_ID, request_id)

    def set_response(
        self,
        *,
        model: str | None = None,
        response_id: str | None = None,
        finish_reasons: Sequence[str] | None = None,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
    ) -> None:
        self._span.set_attributes(
            _present(
                {
                    GEN_AI_RESPONSE_MODEL: model,
                    GEN_AI_RESPONSE_ID: response_id,
                    GEN_AI_RESPONSE_FINISH_REASONS: (
                        list(finish_reasons) if finish_reasons is not None else None
                    ),
                    GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
                    GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
                }
            )
        )

    def record_output(self, text: str, finish_reason: str | None = None) -> None:
        if not self._capture:
            return
        message: dict[str, Any] = {
            "role": "assistant",
            "parts": [{"type": "text", "content": text}],
        }
        if finish_reason:
            message["finish_reason"] = finish_reason
        self._span.set_attribute(GEN_AI_OUTPUT_MESSAGES, json.dumps([message]))

    def failed(self, reason: str, *, status: int | None = None, failover: bool = False) -> None:
        self._span.set_attributes(
            _present(
                {
                    ERROR_TYPE: reason,
                    HTTP_RESPONSE_STATUS_CODE: status,
                    GATEWAY_FAILOVER_REASON: reason if failover else None,
                }
            )
        )
        self._span.set_status(Status(StatusCode.ERROR, reason))
        self._failed = True

    def end(self, status: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        if status is not None:
            self._span.set_attribute(HTTP_RESPONSE_STATUS_CODE, status)
            if status >= 400 and not self._failed:
                self._span.set_attribute(ERROR_TYPE, str(status))
                self._span.set_status(Status(StatusCode.ERROR))
        self._span.end()


def _input_messages(messages: Sequence[Mapping[str, Any]]) -> str:
    """Chat messages in the conventions' shape: role and text parts."""
    converted = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            parts = [{"type": "text", "content": content}]
        elif isinstance(content, list):
            parts = [
                {"type": "text", "content": part.get("text", "")}
                for part in content
                if isinstance(part, Mapping) and part.get("type") in ("text", "input_text")
            ]
        else:
            parts = []
        converted.append({"role": message.get("role", "user"), "parts": parts})
    return json.dumps(converted)


class _RecordingRequest(RequestTrace):
    __slots__ = ("_tracer", "_span", "_capture", "_request", "_input", "_attempts", "_deployment")
    recording = True

    def __init__(self, tracer: trace.Tracer, span: trace.Span, capture: bool) -> None:
        self._tracer = tracer
        self._span = span
        self._capture = capture
        self._request: dict[str, Any] = {}
        self._input: str | None = None
        self._attempts = 0
        self._deployment: str | None = None

    def set_request(
        self,
        *,
        operation: str,
        model: str | None = None,
        api: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stream: bool | None = None,
    ) -> None:
        self._request = _present(
            {
                GEN_AI_OPERATION_NAME: operation,
                GEN_AI_PROVIDER_NAME: PROVIDER_NAME,
                GEN_AI_SYSTEM: PROVIDER_NAME,
                GEN_AI_REQUEST_MODEL: model,
                OPENAI_API_TYPE: api,
                GEN_AI_REQUEST_MAX_TOKENS: max_tokens,
                GEN_AI_REQUEST_TEMPERATURE: temperature,
                GEN_AI_REQUEST_STREAM: stream,
            }
        )
        self._span.set_attributes(
            _present({GEN_AI_OPERATION_NAME: operation, GEN_AI_REQUEST_MODEL: model})
        )

    def set_key(self, name: str | None) -> None:
        if name:
            self._span.set_attribute(GATEWAY_KEY_NAME, name)

    def set_request_id(self, request_id: str | None) -> None:
        if request_id:
            self._span.set_attribute(GATEWAY_REQUEST_ID, request_id)

    def record_input(self, messages: Sequence[Mapping[str, Any]]) -> None:
        if self._capture:
            self._input = _input_messages(messages)

    def attempt(self, deployment: str, number: int, *, endpoint: str | None = None) -> AttemptTrace:
        self._attempts = max(self._attempts, number)
        self._deployment = deployment
        operation = self._request.get(GEN_AI_OPERATION_NAME, "chat")
        model = self._request.get(GEN_AI_REQUEST_MODEL)
        attributes = {
            **self._request,
            GEN_AI_OPERATION_NAME: operation,
            GEN_AI_PROVIDER_NAME: PROVIDER_NAME,
            GEN_AI_SYSTEM: PROVIDER_NAME,
            GATEWAY_DEPLOYMENT: deployment,
            GATEWAY_ATTEMPT: number,
        }
        if endpoint:
            parts = urlsplit(endpoint)
            attributes[SERVER_ADDRESS] = parts.hostname
            attributes[SERVER_PORT] = parts.port or (443 if parts.scheme == "https" else 80)
        if self._input is not None:
            attributes[GEN_AI_INPUT_MESSAGES] = self._input
        started = time_ns()
        span = self._tracer.start_span(
            f"{operation} {model}" if model else operation,
            context=trace.set_span_in_context(self._span),
            kind=SpanKind.CLIENT,
            attributes=_present(attributes),
            start_time=started,
        )
        return _RecordingAttempt(span, started, self._capture)

    def end(self, status: int, *, error_type: str | None = None) -> None:
        self._span.set_attributes(
            _present(
                {
                    HTTP_RESPONSE_STATUS_CODE: status,
                    GATEWAY_UPSTREAM_ATTEMPTS: self._attempts or None,
                    GATEWAY_DEPLOYMENT: self._deployment,
                }
            )
        )
        # For a server, only its own failures (5xx) are errors; a 4xx is the caller's.
        if status >= 500:
            self._span.set_attribute(ERROR_TYPE, error_type or str(status))
            self._span.set_status(Status(StatusCode.ERROR, error_type))
        self._span.end()


class OneLinePerInterval(logging.Filter):
    """Lets one record through per `interval` seconds, saying how many it held back."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self._clock = clock
        self._last: float | None = None
        self._held = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        with self._lock:
            if self._last is not None and now - self._last < self.interval:
                self._held += 1
                return False
            self._last, held, self._held = now, self._held, 0
        if held:
            record.msg = f"{record.getMessage()} ({held} similar lines held back)"
            record.args = None
        return True


def quiet_exporter_logs(interval: float = EXPORT_LOG_INTERVAL) -> None:
    """At most one exporter log line per `interval`; loggers are the process's, so once."""
    for name in EXPORTER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(known, OneLinePerInterval) for known in logger.filters):
            logger.addFilter(OneLinePerInterval(interval))


class OpenTelemetryTracer(Tracer):
    """Tracing on: spans through the SDK's batch processor to the OTLP/HTTP exporter."""

    enabled = True

    def __init__(self, settings: TracingSettings, *, on_dropped: Callable[[int], None]) -> None:
        if settings.endpoint is None:
            raise ValueError("tracing needs an OTLP endpoint")
        quiet_exporter_logs()
        self._capture = settings.capture_content
        resource = Resource(
            {
                "telemetry.sdk.language": "python",
                "telemetry.sdk.name": "opentelemetry",
                "telemetry.sdk.version": SDK_VERSION,
                **dict(settings.resource_attributes),
                "service.name": settings.service_name,
            }
        )
        exporter = OTLPSpanExporter(
            endpoint=settings.endpoint,
            certificate_file=settings.certificate_file,
            headers={key: value.reveal() for key, value in settings.headers},
            timeout=settings.export_timeout,
            compression=Compression.Gzip
            if settings.compression == "gzip"
            else Compression.NoCompression,
        )
        account = _QueueAccount(settings.max_queue_size, on_dropped)
        self._processor = _CountingBatchProcessor(
            _CountingExporter(exporter, account), account, settings
        )
        self._provider = TracerProvider(
            sampler=build_sampler(settings.sampler, settings.sampler_ratio),
            resource=resource,
            shutdown_on_exit=False,
        )
        self._provider.add_span_processor(self._processor)
        self._tracer = self._provider.get_tracer(INSTRUMENTATION_NAME)
        self._shutdown_worker: threading.Thread | None = None

    def request(self, method: str, route: str, headers: Mapping[str, str]) -> RequestTrace:
        span = self._tracer.start_span(
            f"{method} {route}",
            context=_PROPAGATOR.extract(headers),
            kind=SpanKind.SERVER,
            attributes={HTTP_REQUEST_METHOD: method, HTTP_ROUTE: route},
        )
        return _RecordingRequest(self._tracer, span, self._capture)

    def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        # The SDK's shutdown waits up to 30 s for a collector; run it aside and
        # wait only `timeout`. Its thread is a daemon: it cannot hold the exit.
        # A second call waits for the first one's thread.
        if self._shutdown_worker is not None:
            self._shutdown_worker.join(timeout)
            return not self._shutdown_worker.is_alive()
        worker = self._shutdown_worker = threading.Thread(
            target=self._provider.shutdown, name="trace-shutdown", daemon=True
        )
        worker.start()
        worker.join(timeout)
        return not worker.is_alive()


def _ignore_drops(count: int) -> None:
    """Drops are only counted when someone asks to hear of them."""


def start_tracing(
    settings: TracingSettings, *, on_dropped: Callable[[int], None] = _ignore_drops
) -> Tracer:
    """The tracer `settings` ask for: the real one, or the one that costs nothing."""
    if not settings.enabled:
        return Tracer()
    return OpenTelemetryTracer(settings, on_dropped=on_dropped)
