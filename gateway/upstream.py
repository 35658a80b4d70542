"""The one place that builds and sends requests to Azure OpenAI.

Requests go through `KeepAliveHTTPClient` (gateway/httpclient.py), an
`AsyncHTTPClient` that keeps connections to Azure alive and drops one at
once when asked. Aborting (caller gone, first-byte or idle timeout) is
`UpstreamCall.abort`: the connection is closed there and then, and the
exchange waiting on it returns None.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, parse_response_start_line
from tornado.ioloop import IOLoop

from .config import Settings
from .deployments import Deployment
from .errors import GatewayError, map_transport_error, map_upstream_status
from .httpclient import HTTPTransportError, KeepAliveHTTPClient, parse_header_lines
from .sse import EventFramer, is_done

USER_AGENT = "azure-gpt-api"
# Enough for any chat completion; it only guards against a runaway upstream.
MAX_UPSTREAM_BODY = 256 * 1024 * 1024
# Error bodies are small JSON objects; keep no more than this of one.
MAX_ERROR_BODY = 64 * 1024


class UpstreamCall:
    """One attempt at a request to Azure, which its owner can abort while it runs."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.abort_reason: str | None = None
        self._stop: Callable[[], object] | None = None

    def abort(self, reason: str) -> None:
        """Give up on this attempt now: its connection is closed at once."""
        if self.abort_reason is None:
            self.abort_reason = reason
            if self._stop is not None:
                self._stop()

    def running(self, stop: Callable[[], object]) -> None:
        """The transfer has started; `stop` ends it."""
        self._stop = stop


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: HTTPHeaders
    body: bytes
    document: dict[str, Any]  # the body, parsed


class StreamSink(Protocol):
    """Where a relayed stream goes: the caller's connection."""

    def start(self, upstream_headers: HTTPHeaders) -> None: ...

    def send(self, events: list[bytes]) -> None:
        """Write the events of one read from Azure, together, and flush them."""

    def fail(self, error: GatewayError) -> None: ...


class UpstreamClient:
    """Sends chat-completions requests to Azure deployments over pooled connections."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http = KeepAliveHTTPClient(
            force_instance=True,
            max_clients=settings.max_clients,
            max_body_size=MAX_UPSTREAM_BODY,
            proxies={scheme: url.reveal() for scheme, url in settings.proxies.items()},
        )

    def close(self) -> None:
        self._http.close()

    def build_request(
        self,
        deployment: Deployment,
        body: bytes,
        call: UpstreamCall,
        *,
        stream: bool,
        **callbacks: object,
    ) -> HTTPRequest:
        """The upstream HTTP request: URL, headers, timeouts. Streams have no overall limit."""
        return HTTPRequest(
            deployment.chat_url,
            method="POST",
            body=body,
            headers={
                "Content-Type": "application/json",
                "api-key": deployment.key.reveal(),
                "x-request-id": call.request_id,
                "x-ms-client-request-id": call.request_id,
            },
            user_agent=USER_AGENT,
            connect_timeout=self._settings.connect_timeout,
            request_timeout=0 if stream else self._settings.request_timeout,
            **callbacks,
        )

    async def _exchange(
        self, request: HTTPRequest, call: UpstreamCall
    ) -> HTTPResponse | HTTPTransportError | None:
        """Fetch: the response, the transport failure, or None when the call was aborted."""
        if call.abort_reason:
            return None
        fetch = self._http.fetch(request, raise_error=False)
        call.running(lambda: self._http.abort(request))
        try:
            return await fetch
        except HTTPTransportError as error:
            return None if call.abort_reason else error

    async def complete(
        self, deployment: Deployment, body: bytes, call: UpstreamCall
    ) -> UpstreamResponse | None:
        """Send a non-stream request; raise GatewayError for anything but a 200.

        None means the call was aborted (the caller went away).
        """
        outcome = await self._exchange(self.build_request(deployment, body, call, stream=False), call)
        if outcome is None:
            return None
        if isinstance(outcome, HTTPTransportError):
            raise map_transport_error(outcome)
        if outcome.code != 200:
            raise map_upstream_status(
                outcome.code,
                outcome.headers,
                outcome.body or b"",
                max_cooldown=self._settings.max_cooldown,
            )
        try:
            document = json.loads(outcome.body)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise GatewayError(
                502,
                "upstream_invalid_response",
                "Azure OpenAI answered 200 with a body that is not a JSON object.",
                upstream_status=200,
                upstream_headers=outcome.headers,
            )
        return UpstreamResponse(outcome.code, outcome.headers, outcome.body, document)

    async def stream(
        self, deployment: Deployment, body: bytes, call: UpstreamCall, sink: StreamSink
    ) -> None:
        """Relay Azure's stream to `sink` event by event, the moment each arrives.

        Before the first event reaches the caller a failure is raised as
        GatewayError (the handler answers with a normal error response, or
        fails over); after it, the failure goes to `sink.fail` as one last event.
        """
        relay = _StreamRelay(sink, call, self._settings)
        request = self.build_request(
            deployment,
            body,
            call,
            stream=True,
            header_callback=relay.on_header_line,
            streaming_callback=relay.on_chunk,
        )
        relay.arm_timer()
        try:
            outcome = await self._exchange(request, call)
        finally:
            relay.disarm_timer()
        relay.finish(outcome if isinstance(outcome, HTTPTransportError) else None)


class _StreamRelay:
    """The per-stream state behind `UpstreamClient.stream`."""

    def __init__(self, sink: StreamSink, call: UpstreamCall, settings: Settings) -> None:
        self.sink = sink
        self.call = call
        self.first_byte_timeout = settings.first_byte_timeout
        self.idle_timeout = settings.stream_idle_timeout
        self.max_cooldown = settings.max_cooldown
        self.status: int | None = None
        self._header_lines: list[str] = []
        self._headers: HTTPHeaders | None = None
        self.error_body = bytearray()
        self.framer = EventFramer()
        self.started = False
        self.done = False
        self.started_at = self.last_activity = time.monotonic()
        self._timer: object | None = None

    def on_header_line(self, raw: str) -> None:
        self.last_activity = time.monotonic()
        line = raw.rstrip("\r\n")
        if line.startswith("HTTP/"):
            self.status = parse_response_start_line(line).code
        elif line:
            self._header_lines.append(line)

    @property
    def headers(self) -> HTTPHeaders:
        """Azure's response headers, parsed when first needed (the client checked them already)."""
        if self._headers is None:
            self._headers = parse_header_lines(self._header_lines)
        return self._headers

    def on_chunk(self, chunk: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.call.abort_reason:
            return
        if self.status != 200:
            if len(self.error_body) < MAX_ERROR_BODY:
                self.error_body += chunk
            return
        events = self.framer.feed(chunk)
        if not events:
            return
        if not self.started:
            self.started = True
            self.sink.start(self.headers)
        self.done = is_done(events[-1])
        # One write to the caller per read from Azure: events that arrived
        # together leave together, and none waits for a later read.
        self.sink.send(events)

    def arm_timer(self) -> None:
        self._timer = IOLoop.current().call_later(
            min(self.first_byte_timeout, self.idle_timeout), self._check_timeouts
        )

    def disarm_timer(self) -> None:
        if self._timer is not None:
            IOLoop.current().remove_timeout(self._timer)
            self._timer = None

    def _check_timeouts(self) -> None:
        # One timer re-armed for the nearest deadline, rather than a new timer per chunk.
        now = time.monotonic()
        if self.status is None:
            reason, remaining = "first_byte_timeout", self.started_at + self.first_byte_timeout - now
        else:
            reason, remaining = "idle", self.last_activity + self.idle_timeout - now
        if remaining > 0:
            self._timer = IOLoop.current().call_later(remaining, self._check_timeouts)
        else:
            self._timer = None
            self.call.abort(reason)

    def finish(self, transport_error: HTTPTransportError | None) -> None:
        error = self._outcome(transport_error)
        if error is None:
            return
        if self.started:
            self.sink.fail(error)
        else:
            raise error

    def _outcome(self, transport_error: HTTPTransportError | None) -> GatewayError | None:
        reason = self.call.abort_reason
        if reason == "client_gone":
            return None
        if reason == "first_byte_timeout":
            return GatewayError(
                504,
                "upstream_timeout",
                f"Azure OpenAI sent no response headers within {self.first_byte_timeout:g} s.",
                retryable=True,
            )
        if reason == "idle":
            return GatewayError(
                504,
                "stream_idle_timeout",
                f"Azure OpenAI sent nothing for {self.idle_timeout:g} s; the stream was closed.",
            )
        if transport_error is not None and self.started:
            return GatewayError(
                502,
                "stream_interrupted",
                f"The stream from Azure OpenAI was cut ({transport_error.message}).",
            )
        if transport_error is not None:
            return map_transport_error(transport_error)
        if self.status != 200:
            return map_upstream_status(
                self.status or 502,
                self.headers,
                bytes(self.error_body),
                max_cooldown=self.max_cooldown,
            )
        if not self.done:
            return GatewayError(
                502,
                "stream_interrupted",
                "Azure OpenAI ended the stream before its final [DONE] event.",
            )
        return None
