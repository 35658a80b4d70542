"""A local OTLP/HTTP trace receiver: what a collector would get, decoded, on 127.0.0.1.

It runs on its own thread and event loop, so code under test may block its
own thread (a tracer's shutdown flushing to it) and still be answered.
`wait_for_spans` blocks; `spans_arrived` awaits, for tests whose gateway runs
on the test's own loop.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

START_TIMEOUT = 10.0
WAIT_TIMEOUT = 10.0
# Tracer settings that export each span as soon as it ends, so tests wait on arrivals,
# not on the batch processor's schedule.
EXPORT_AT_ONCE = {"OTEL_BSP_SCHEDULE_DELAY": "10"}


def any_value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind) if kind else None


def attributes(pairs: Iterable[KeyValue]) -> dict[str, Any]:
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class ReceivedEvent:
    name: str
    time_ns: int
    attributes: dict[str, Any]


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector saw it, ids in hex as `traceparent` writes them."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    events: tuple[ReceivedEvent, ...]
    status: str
    status_message: str
    resource: dict[str, Any]
    start_ns: int
    end_ns: int

    def all_strings(self) -> list[str]:
        """Every string value in the span, to look for text that must not be there."""
        found: list[str] = [self.name, self.status_message]

        def walk(value: Any) -> None:
            if isinstance(value, str):
                found.append(value)
            elif isinstance(value, list):
                for item in value:
                    walk(item)
            elif isinstance(value, dict):
                for item in value.values():
                    walk(item)

        walk(self.attributes)
        for event in self.events:
            found.append(event.name)
            walk(event.attributes)
        return found


def decode_request(body: bytes) -> list[ReceivedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        name=span.name,
                        kind=Span.SpanKind.Name(span.kind),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes=attributes(span.attributes),
                        events=tuple(
                            ReceivedEvent(e.name, e.time_unix_nano, attributes(e.attributes))
                            for e in span.events
                        ),
                        status=Status.StatusCode.Name(span.status.code),
                        status_message=span.status.message,
                        resource=resource,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                    )
                )
    return spans


@dataclass
class _Waiter:
    count: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[list[ReceivedSpan]]


class _TracesHandler(RequestHandler):
    def initialize(self, receiver: OTLPReceiver) -> None:
        self.receiver = receiver

    async def post(self) -> None:
        body = self.request.body
        if self.request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        self.receiver._request_arrived()
        await self.receiver._held.wait()
        self.receiver._add(decode_request(body))
        self.set_header("Content-Type", "application/x-protobuf")
        self.finish(ExportTraceServiceResponse().SerializeToString())


class OTLPReceiver:
    """`POST /v1/traces` on 127.0.0.1; start with `with OTLPReceiver() as receiver:`."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self.port = 0
        self._changed = threading.Condition()
        self._waiters: list[_Waiter] = []
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="otlp-receiver", daemon=True)
        # Made on the receiver's own loop, in _serve.
        self._loop: asyncio.AbstractEventLoop
        self._stopped: asyncio.Event
        self._held: asyncio.Event

    @property
    def endpoint(self) -> str:
        """The base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` takes it."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> OTLPReceiver:
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the OTLP receiver did not start")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._loop.call_soon_threadsafe(self._held.set)
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(START_TIMEOUT)

    def _run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._held = asyncio.Event()
        self._held.set()
        sockets = bind_sockets(0, "127.0.0.1")
        self.port = sockets[0].getsockname()[1]
        server = HTTPServer(Application([(r"/v1/traces", _TracesHandler, {"receiver": self})]))
        server.add_sockets(sockets)
        self._ready.set()
        await self._stopped.wait()
        server.stop()
        await server.close_all_connections()

    def _on_loop(self, action: Callable[[], object]) -> None:
        """Run `action` on the receiver's loop and return once it has run."""
        done = threading.Event()

        def run() -> None:
            action()
            done.set()

        self._loop.call_soon_threadsafe(run)
        if not done.wait(START_TIMEOUT):
            raise RuntimeError("the OTLP receiver's loop does not answer")

    def hold(self) -> None:
        """Take requests but answer none until `release`: a collector that hangs."""
        self._on_loop(self._held.clear)

    def release(self) -> None:
        self._on_loop(self._held.set)

    def _request_arrived(self) -> None:
        with self._changed:
            self.requests += 1
            self._changed.notify_all()

    def _add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self.spans.extend(spans)
            self._changed.notify_all()
            snapshot = list(self.spans)
            due = [waiter for waiter in self._waiters if len(snapshot) >= waiter.count]
            self._waiters = [waiter for waiter in self._waiters if waiter not in due]
        for waiter in due:
            waiter.loop.call_soon_threadsafe(_settle, waiter.future, snapshot)

    def wait_for_requests(self, count: int, timeout: float = WAIT_TIMEOUT) -> None:
        """Block until `count` export requests have arrived (answered or held)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self.requests >= count, timeout):
                raise AssertionError(f"{self.requests} export requests arrived, not {count}")

    def wait_for_spans(self, count: int, timeout: float = WAIT_TIMEOUT) -> list[ReceivedSpan]:
        """Block until at least `count` spans have arrived; all received so far."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.spans) >= count, timeout):
                raise AssertionError(f"{len(self.spans)} spans arrived, not {count}")
            return list(self.spans)

    async def spans_arrived(self, count: int, timeout: float = WAIT_TIMEOUT) -> list[ReceivedSpan]:
        """Await at least `count` spans without blocking the caller's event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[ReceivedSpan]] = loop.create_future()
        with self._changed:
            if len(self.spans) >= count:
                return list(self.spans)
            self._waiters.append(_Waiter(count, loop, future))
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise AssertionError(f"{len(self.spans)} spans arrived, not {count}") from None


def _settle(future: asyncio.Future[list[ReceivedSpan]], spans: list[ReceivedSpan]) -> None:
    if not future.done():
        future.set_result(spans)


def by_kind(spans: list[ReceivedSpan]) -> tuple[ReceivedSpan, list[ReceivedSpan]]:
    """Split one request's spans into its server span and its client spans in attempt order."""
    (server,) = [span for span in spans if span.kind == "SPAN_KIND_SERVER"]
    clients = sorted(
        (span for span in spans if span.kind == "SPAN_KIND_CLIENT"),
        key=lambda span: span.attributes["gateway.attempt"],
    )
    return server, clients
