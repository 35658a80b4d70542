"""The one place that builds and sends requests to Azure OpenAI.

Uses Tornado's curl `AsyncHTTPClient`: it keeps upstream connections alive
(the simple client opens a new TCP+TLS connection per request) and costs about
half the CPU.

Aborting (caller gone, first-byte or idle timeout): the curl client swallows
exceptions raised from a `streaming_callback`, so `UpstreamCall.abort` sets a
flag that libcurl's progress function reports at its next tick (often while
data flows, once a second while it waits), which drops the connection. The
caller's side does not wait for that: `abort` also resolves a future the
exchange is waiting on, so the answer (or the retry) goes out at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import pycurl
from tornado.curl_httpclient import CurlAsyncHTTPClient, CurlError
from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders, parse_response_start_line
from tornado.ioloop import IOLoop

from .config import Settings
from .deployments import Deployment
from .errors import GatewayError, map_transport_error, map_upstream_status
from .sse import EventFramer, is_done

USER_AGENT = "azure-gpt-api"
# Enough for any chat completion; it only guards against a runaway upstream.
MAX_UPSTREAM_BODY = 256 * 1024 * 1024
# LOW_SPEED_TIME (seconds) used only to wake the progress function each second.
PROGRESS_WAKEUP_NEVER_TRIPS = 10**7
# Error bodies are small JSON objects; keep no more than this of one.
MAX_ERROR_BODY = 64 * 1024


class UpstreamCall:
    """One attempt at a request to Azure, which its owner can abort while it runs."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.abort_reason: str | None = None
        self.aborted: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.on_header_line: Callable[[bytes], None] | None = None

    def abort(self, reason: str) -> None:
        """Give up on this attempt now; libcurl drops the transfer at its next progress tick."""
        if self.abort_reason is None:
            self.abort_reason = reason
            self.aborted.set_result(reason)

    def _progress(self, *_counts: int) -> int:
        return 1 if self.abort_reason else 0

    def prepare_curl(self, curl: pycurl.Curl) -> None:
        # Handles are pooled, so every option set here is set on every request.
        curl.setopt(pycurl.NOPROGRESS, 0)
        curl.setopt(pycurl.XFERINFOFUNCTION, self._progress)
        # libcurl calls the progress function only when it runs a transfer.
        # A low-speed limit makes it re-check every transfer once a second,
        # even one waiting on a silent upstream; the time is too long to
        # ever trip (idleness is STREAM_IDLE_TIMEOUT's job).
        curl.setopt(pycurl.LOW_SPEED_LIMIT, 1)
        curl.setopt(pycurl.LOW_SPEED_TIME, PROGRESS_WAKEUP_NEVER_TRIPS)
        # Tornado turns on VERBOSE when its curl logger is at DEBUG, which
        # would log the api-key request header.
        curl.setopt(pycurl.VERBOSE, 0)
        curl.setopt(pycurl.NOSIGNAL, 1)
        if self.on_header_line is not None:
            # Tornado hands header lines to a header_callback through the
            # IOLoop, and they can arrive after the first body chunks; a
            # relay must know the status before it forwards a single byte.
            curl.setopt(pycurl.HEADERFUNCTION, self.on_header_line)


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: HTTPHeaders
    body: bytes
    document: dict[str, Any]  # the body, parsed


class StreamSink(Protocol):
    """Where a relayed stream goes: the caller's connection."""

    def start(self, upstream_headers: HTTPHeaders) -> None: ...

    def send(self, event: bytes) -> None: ...

    def flush_events(self) -> None: ...

    def fail(self, error: GatewayError) -> None: ...


class UpstreamClient:
    """Sends chat-completions requests to Azure deployments over pooled connections."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._http = CurlAsyncHTTPClient(
            force_instance=True,
            max_clients=settings.max_clients,
            max_body_size=MAX_UPSTREAM_BODY,
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
            prepare_curl_callback=call.prepare_curl,
            **callbacks,
        )

    async def _exchange(self, request: HTTPRequest, call: UpstreamCall) -> object:
        """Fetch, or stop waiting as soon as the call is aborted.

        Returns the HTTPResponse, a CurlError for a transport failure, or None
        when the call was aborted first (the transfer then ends in the
        background at libcurl's next progress tick).
        """
        fetch = asyncio.ensure_future(self._http.fetch(request, raise_error=False))
        await asyncio.wait({fetch, call.aborted}, return_when=asyncio.FIRST_COMPLETED)
        if not fetch.done():
            fetch.add_done_callback(_discard_outcome)
            return None
        error = fetch.exception()
        if isinstance(error, CurlError):
            return None if call.abort_reason else error
        return fetch.result()

    async def complete(
        self, deployment: Deployment, body: bytes, call: UpstreamCall
    ) -> UpstreamResponse | None:
        """Send a non-stream request; raise GatewayError for anything but a 200.

        None means the call was aborted (the caller went away).
        """
        outcome = await self._exchange(self.build_request(deployment, body, call, stream=False), call)
        if outcome is None:
            return None
        if isinstance(outcome, CurlError):
            raise map_transport_error(outcome.errno, outcome.message)
        if outcome.code != 200:
            raise map_upstream_status(outcome.code, outcome.headers, outcome.body or b"")
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
        relay = _StreamRelay(
            sink, call, self._settings.first_byte_timeout, self._settings.stream_idle_timeout
        )
        call.on_header_line = relay.on_header_line
        request = self.build_request(
            deployment, body, call, stream=True, streaming_callback=relay.on_chunk
        )
        relay.arm_timer()
        try:
            outcome = await self._exchange(request, call)
        finally:
            relay.disarm_timer()
        relay.finish(outcome if isinstance(outcome, CurlError) else None)


def _discard_outcome(fetch: asyncio.Future) -> None:
    # The abandoned transfer ends with "aborted by callback"; nobody reads it.
    if not fetch.cancelled():
        fetch.exception()


class _StreamRelay:
    """The per-stream state behind `UpstreamClient.stream`."""

    def __init__(
        self, sink: StreamSink, call: UpstreamCall, first_byte_timeout: float, idle_timeout: float
    ) -> None:
        self.sink = sink
        self.call = call
        self.first_byte_timeout = first_byte_timeout
        self.idle_timeout = idle_timeout
        self.status: int | None = None
        self.headers = HTTPHeaders()
        self.error_body = bytearray()
        self.framer = EventFramer()
        self.started = False
        self.done = False
        self.started_at = self.last_activity = time.monotonic()
        self._timer: object | None = None

    def on_header_line(self, raw: bytes) -> None:
        """libcurl HEADERFUNCTION: runs inside libcurl, so it only records."""
        self.last_activity = time.monotonic()
        line = raw.decode("latin1").rstrip("\r\n")
        if line.startswith("HTTP/"):
            self.status = parse_response_start_line(line).code
            self.headers = HTTPHeaders()
        elif line:
            self.headers.parse_line(line)

    def on_chunk(self, chunk: bytes) -> None:
        self.last_activity = time.monotonic()
        if self.call.abort_reason:
            return
        if self.status != 200:
            if len(self.error_body) < MAX_ERROR_BODY:
                self.error_body += chunk
            return
        events = self.framer.feed(chunk)
        for event in events:
            if not self.started:
                self.started = True
                self.sink.start(self.headers)
            if is_done(event):
                self.done = True
            self.sink.send(event)
        if events:
            # One write to the caller per read from Azure: events that arrived
            # together leave together, and none waits for a later read.
            self.sink.flush_events()

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

    def finish(self, transport_error: CurlError | None) -> None:
        error = self._outcome(transport_error)
        if error is None:
            return
        if self.started:
            self.sink.fail(error)
        else:
            raise error

    def _outcome(self, transport_error: CurlError | None) -> GatewayError | None:
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
            return map_transport_error(transport_error.errno, transport_error.message)
        if self.status != 200:
            return map_upstream_status(self.status or 502, self.headers, bytes(self.error_body))
        if not self.done:
            return GatewayError(
                502,
                "stream_interrupted",
                "Azure OpenAI ended the stream before its final [DONE] event.",
            )
        return None
