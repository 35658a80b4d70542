"""Requests to Azure OpenAI, one attempt at a time: an answer read whole, or a stream pulled.

Requests go through `KeepAliveHTTPClient` (gateway/upstream/httpclient/), an
`AsyncHTTPClient` that keeps connections to Azure alive and drops one at
once when asked. URLs come from gateway/upstream/urls.py, the headers that
authenticate a deployment from its `UpstreamAuth`, and what a failure means
from gateway/errors.py.

A stream is pulled: `UpstreamStream` is an async iterator of the events that
arrived since the last pull. The client's `streaming_callback` feeds a
bounded buffer; while the caller reads slower than Azure sends, the buffer
fills, the connection stops reading (`pause_reading`) and Azure's writes
block in TCP, so a slow caller costs at most `STREAM_BUFFER_LIMIT` bytes of
memory, however long the answer.

Aborting (caller gone, first-byte or idle timeout) is `UpstreamCall.abort`:
the connection is closed there and then.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, parse_response_start_line

from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    invalid_success_body,
    map_transport_error,
    map_upstream_status,
    stream_failure,
)
from gateway.policy.deployments import Deployment
from gateway.secret import Secret
from gateway.upstream.httpclient import HTTPTransportError, KeepAliveHTTPClient, parse_header_lines
from gateway.upstream.sse import EventFramer, is_done
from gateway.upstream.urls import upstream_url

USER_AGENT = "azure-gpt-api"
# Enough for any chat completion; it only guards against a runaway upstream.
MAX_UPSTREAM_BODY = 256 * 1024 * 1024
# Error bodies are small JSON objects; keep no more than this of one.
MAX_ERROR_BODY = 64 * 1024
# The most bytes of one stream the gateway holds for a caller that reads
# slower than Azure sends: events received and not yet written to the
# caller's socket (one event is always held whole, however large).
STREAM_BUFFER_LIMIT = 1024 * 1024
# The most one read from a socket delivers (asyncio's and uvloop's read
# buffers are 256 KiB).
MAX_READ_SIZE = 256 * 1024
# The most events one step of the iteration hands out (at least one event).
# They are held twice until written: joined into one chunk, then framed by
# the HTTP layer.
MAX_STEP_SIZE = 256 * 1024
# Reading pauses at PAUSE_AT, so the read in progress and a step still fit
# the limit; it resumes once the caller has taken the queue below RESUME_AT.
PAUSE_AT = STREAM_BUFFER_LIMIT - MAX_READ_SIZE - MAX_STEP_SIZE
RESUME_AT = PAUSE_AT // 2


class UpstreamAuth(Protocol):
    """What authenticates requests to one deployment; asked again for every attempt."""

    async def headers(self) -> Mapping[str, str]: ...


class ApiKeyAuth:
    """The deployment's key in Azure's `api-key` header."""

    def __init__(self, key: Secret) -> None:
        self._key = key

    async def headers(self) -> Mapping[str, str]:
        return {"api-key": self._key.reveal()}


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


class UpstreamClient:
    """Sends requests to Azure deployments over pooled connections."""

    def __init__(
        self,
        settings: Settings,
        auth_for: Callable[[Deployment], UpstreamAuth] = lambda deployment: ApiKeyAuth(
            deployment.key
        ),
    ) -> None:
        self._settings = settings
        self._auth_for = auth_for
        self._auth: dict[str, UpstreamAuth] = {}
        self._http = KeepAliveHTTPClient(
            force_instance=True,
            max_clients=settings.max_clients,
            max_body_size=MAX_UPSTREAM_BODY,
            proxies={scheme: url.reveal() for scheme, url in settings.proxies.items()},
        )
        self.streams: set[UpstreamStream] = set()

    def close(self) -> None:
        self._http.close()

    def buffered_bytes(self) -> int:
        """Bytes of open streams held for their callers now (each ≤ STREAM_BUFFER_LIMIT)."""
        return sum(stream.buffered for stream in self.streams)

    async def _request(
        self,
        deployment: Deployment,
        operation: str,
        body: bytes,
        call: UpstreamCall,
        *,
        stream: bool,
        **callbacks: Any,
    ) -> HTTPRequest:
        """The upstream HTTP request: URL, headers, timeouts. Streams have no overall limit."""
        auth = self._auth.get(deployment.name)
        if auth is None:
            auth = self._auth[deployment.name] = self._auth_for(deployment)
        return HTTPRequest(
            upstream_url(deployment, operation),
            method="POST",
            body=body,
            headers={
                "Content-Type": "application/json",
                **await auth.headers(),
                "x-request-id": call.request_id,
                "x-ms-client-request-id": call.request_id,
            },
            user_agent=USER_AGENT,
            connect_timeout=self._settings.connect_timeout,
            request_timeout=0 if stream else self._settings.request_timeout,
            **callbacks,
        )

    def _fetch(self, request: HTTPRequest, call: UpstreamCall) -> asyncio.Future[HTTPResponse]:
        fetch = self._http.fetch(request, raise_error=False)
        call.running(lambda: self._http.abort(request))
        return fetch

    async def complete(
        self, deployment: Deployment, operation: str, body: bytes, call: UpstreamCall
    ) -> UpstreamResponse | None:
        """Send a non-stream request; raise GatewayError for anything but a 200.

        None means the call was aborted (the caller went away).
        """
        request = await self._request(deployment, operation, body, call, stream=False)
        if call.abort_reason:
            return None
        try:
            outcome = await self._fetch(request, call)
        except HTTPTransportError as error:
            if call.abort_reason:
                return None
            raise map_transport_error(error) from None
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
            raise invalid_success_body(outcome.headers)
        return UpstreamResponse(outcome.code, outcome.headers, outcome.body, document)

    async def open_stream(
        self, deployment: Deployment, operation: str, body: bytes, call: UpstreamCall
    ) -> UpstreamStream | None:
        """Send a stream request and wait for its first events.

        A failure before them is raised as GatewayError (so another
        deployment may be tried); after them, it ends the iteration (see
        `UpstreamStream`). None means the call was aborted (the caller went away).
        """
        stream = UpstreamStream(self, call)
        request = await self._request(
            deployment,
            operation,
            body,
            call,
            stream=True,
            header_callback=stream.on_header_line,
            streaming_callback=stream.on_chunk,
        )
        if call.abort_reason:
            return None
        self.streams.add(stream)
        try:
            await stream.start(request, self._fetch(request, call))
        except BaseException:
            stream.close()
            raise
        if call.abort_reason:
            self.streams.discard(stream)
            return None
        return stream

    def pause_reading(self, request: HTTPRequest) -> None:
        self._http.pause_reading(request)

    def resume_reading(self, request: HTTPRequest) -> None:
        self._http.resume_reading(request)

    def stream_ended(self, stream: UpstreamStream) -> None:
        self.streams.discard(stream)

    @property
    def first_byte_timeout(self) -> float:
        return self._settings.first_byte_timeout

    @property
    def stream_idle_timeout(self) -> float:
        return self._settings.stream_idle_timeout

    @property
    def max_cooldown(self) -> float:
        return self._settings.max_cooldown


class UpstreamStream:
    """Azure's event stream: `async for events in stream` gives the whole events received
    since the previous step (a list of raw event bytes, never empty).

    The iteration ends after Azure's `[DONE]`. A stream that fails after its
    first events raises GatewayError from the iteration, once the events
    before the failure are taken; the caller ending it early calls `close()`.
    """

    def __init__(self, client: UpstreamClient, call: UpstreamCall) -> None:
        self._client = client
        self.call = call
        self.status: int | None = None
        self._header_lines: list[str] = []
        self._headers: HTTPHeaders | None = None
        self._error_body = bytearray()
        self._framer = EventFramer()
        self._request: HTTPRequest | None = None
        self._events: list[bytes] = []
        self._queued = 0  # bytes in _events
        self._lent = 0  # bytes of the events handed out last, until the next step
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.done = False  # [DONE] arrived
        self.started = False  # events were handed out
        self.ended = False  # the transfer is over
        self._transport_error: HTTPTransportError | None = None
        self._opened_at = self._last_activity = time.monotonic()

    @property
    def buffered(self) -> int:
        """Bytes held for the caller: queued, and handed out (twice) but not yet written."""
        return self._queued + 2 * self._lent

    @property
    def headers(self) -> HTTPHeaders:
        """Azure's response headers, parsed when first needed (the client checked them already)."""
        if self._headers is None:
            self._headers = parse_header_lines(self._header_lines)
        return self._headers

    # --- fed by the HTTP client ------------------------------------------

    def on_header_line(self, raw: str) -> None:
        self._last_activity = time.monotonic()
        line = raw.rstrip("\r\n")
        if line.startswith("HTTP/"):
            self.status = parse_response_start_line(line).code
        elif line:
            self._header_lines.append(line)

    def on_chunk(self, chunk: bytes) -> None:
        self._last_activity = time.monotonic()
        if self.call.abort_reason:
            return
        if self.status != 200:
            if len(self._error_body) < MAX_ERROR_BODY:
                self._error_body += chunk
            return
        events = self._framer.feed(chunk)
        if not events:
            return
        self.done = is_done(events[-1])
        self._events.extend(events)
        self._queued += sum(map(len, events)) if len(events) > 1 else len(events[0])
        if not self._paused and self.buffered >= PAUSE_AT and self._request:
            self._paused = True
            self._client.pause_reading(self._request)
        self._wake()

    def _fetched(self, fetch: asyncio.Future[HTTPResponse]) -> None:
        self.ended = True
        self._disarm_timer()
        error = fetch.exception()
        if isinstance(error, HTTPTransportError):
            self._transport_error = error
        self._client.stream_ended(self)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # --- pulled by the pipeline ------------------------------------------

    async def start(self, request: HTTPRequest, fetch: asyncio.Future[HTTPResponse]) -> None:
        """Wait for the first events; raise GatewayError if the stream fails before them."""
        self._request = request
        fetch.add_done_callback(self._fetched)
        self._timer = self._loop.call_later(
            min(self._client.first_byte_timeout, self._client.stream_idle_timeout),
            self._check_timeouts,
        )
        while not self._events and not self.ended:
            await self._wait()
        if not self._events:
            error = self._failure()
            if error is not None:
                raise error

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> list[bytes]:
        self._lent = 0
        if self._paused and self._queued < RESUME_AT:
            self._resume()
        while not self._events:
            if self.ended:
                error = self._failure()
                if error is not None:
                    raise error
                raise StopAsyncIteration
            await self._wait()
        if self._queued <= MAX_STEP_SIZE:
            events, self._events, size = self._events, [], self._queued
        else:
            size = count = 0
            for event in self._events:
                size += len(event)
                count += 1
                if size >= MAX_STEP_SIZE:
                    break
            events, self._events = self._events[:count], self._events[count:]
        self.started = True
        self._queued -= size
        self._lent = size
        return events

    def close(self) -> None:
        """Stop the transfer now (the caller went away or stopped reading)."""
        self.call.abort("client_gone")
        self._disarm_timer()
        self._client.stream_ended(self)

    def _resume(self) -> None:
        self._paused = False
        self._last_activity = time.monotonic()  # paused by us: Azure was not silent
        if self._request is not None and not self.ended:
            self._client.resume_reading(self._request)

    # --- timeouts ---------------------------------------------------------

    def _disarm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_timeouts(self) -> None:
        # One timer re-armed for the nearest deadline, rather than a new timer per chunk.
        now = time.monotonic()
        if self.status is None:
            reason = "first_byte_timeout"
            remaining = self._opened_at + self._client.first_byte_timeout - now
        elif self._paused:
            # Not reading because the caller is slow: Azure is not silent, it is held back.
            reason, remaining = "idle", self._client.stream_idle_timeout
        else:
            reason = "idle"
            remaining = self._last_activity + self._client.stream_idle_timeout - now
        if remaining > 0:
            self._timer = self._loop.call_later(remaining, self._check_timeouts)
        else:
            self._timer = None
            self.call.abort(reason)

    def _failure(self) -> GatewayError | None:
        """Why the stream ended without [DONE]; None if it ended well or the caller left."""
        reason = self.call.abort_reason
        if reason == "client_gone" or (self.done and self._transport_error is None):
            return None
        if self._transport_error is not None and reason is None:
            reason = "cut"
        if reason is None and self.status != 200:
            return map_upstream_status(
                self.status or 502,
                self.headers,
                bytes(self._error_body),
                max_cooldown=self._client.max_cooldown,
            )
        return stream_failure(
            reason or "unfinished",
            started=self.started,
            first_byte_timeout=self._client.first_byte_timeout,
            idle_timeout=self._client.stream_idle_timeout,
            transport_error=self._transport_error,
        )
