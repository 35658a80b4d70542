"""Requests to Azure OpenAI, one attempt at a time: an answer read whole, or a stream pulled.

Requests go through `KeepAliveHTTPClient` (gateway/upstream/httpclient/), an
`AsyncHTTPClient` that keeps connections to Azure alive and drops one at
once when asked. URLs come from gateway/upstream/urls.py, the headers that
authenticate a deployment from its `UpstreamAuth` (gateway/upstream/auth.py:
an api-key, or an Entra ID token asked for again after a 401), and what a
failure means from gateway/errors.py.

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
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from tornado.httpclient import HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, parse_response_start_line

from gateway.config import Settings
from gateway.errors import (
    GatewayError,
    entra_refused,
    invalid_success_body,
    map_transport_error,
    map_upstream_status,
    stream_failure,
)
from gateway.policy.deployments import Deployment
from gateway.upstream.auth import ApiKeyAuth, UpstreamAuth
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

AnswerT = TypeVar("AnswerT")


class UpstreamCall:
    """One attempt at a request to Azure, which its owner can abort while it runs."""

    def __init__(self, request_id: str, trace_headers: Mapping[str, str] | None = None) -> None:
        self.request_id = request_id
        # W3C trace context for Azure (`traceparent`, `tracestate`), if any.
        self.trace_headers = trace_headers or {}
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
class UpstreamTarget:
    """What is asked of a deployment: the operation (gateway/upstream/urls.py), the HTTP
    method, an id sub-path (`resp_1/input_items`) and the caller's query string."""

    operation: str
    method: str = "POST"
    item: str = ""
    query: str = ""

    @classmethod
    def of(cls, target: UpstreamTarget | str) -> UpstreamTarget:
        return target if isinstance(target, UpstreamTarget) else cls(target)


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: HTTPHeaders
    body: bytes
    document: dict[str, Any]  # the body, parsed


def api_key_auth(deployment: Deployment) -> UpstreamAuth:
    if deployment.key is None:
        raise ValueError(f"deployment {deployment.name} has no key; give it an Entra auth")
    return ApiKeyAuth(deployment.key)


class UpstreamClient:
    """Sends requests to Azure deployments over pooled connections."""

    def __init__(
        self,
        settings: Settings,
        auth_for: Callable[[Deployment], UpstreamAuth] = api_key_auth,
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

    def auth_of(self, deployment: Deployment) -> UpstreamAuth:
        """The deployment's credentials, made on first use and kept."""
        auth = self._auth.get(deployment.name)
        if auth is None:
            auth = self._auth[deployment.name] = self._auth_for(deployment)
        return auth

    async def get_json(self, url: str, timeout: float) -> Any:
        """GET a JSON document (an OIDC issuer's) through the same connections and proxies."""
        response = await self._http.fetch(
            HTTPRequest(
                url,
                user_agent=USER_AGENT,
                connect_timeout=self._settings.connect_timeout,
                request_timeout=timeout,
            ),
            raise_error=False,
        )
        if response.code != 200:
            raise ValueError(f"{url} answered {response.code}")
        return json.loads(response.body)

    async def _signed(
        self,
        deployment: Deployment,
        send: Callable[[Mapping[str, str]], Awaitable[AnswerT]],
    ) -> AnswerT:
        """`send(auth headers)`, once more with new headers if Azure refused the first (401).

        An api-key is never sent twice (its `reject` says no); an Entra token
        is dropped and a new one tried, and a second 401 names the identity,
        whose role on the resource is then the likely cause.
        """
        auth = self.auth_of(deployment)
        headers = await auth.headers()
        try:
            return await send(headers)
        except GatewayError as error:
            if error.upstream_status != 401 or not auth.reject(headers):
                raise
        try:
            return await send(await auth.headers())
        except GatewayError as error:
            if error.upstream_status == 401:
                raise entra_refused(auth.description, error) from None
            raise

    def buffered_bytes(self) -> int:
        """Bytes of open streams held for their callers now (each ≤ STREAM_BUFFER_LIMIT)."""
        return sum(stream.buffered for stream in self.streams)

    def _request(
        self,
        deployment: Deployment,
        target: UpstreamTarget,
        body: bytes | None,
        call: UpstreamCall,
        auth_headers: Mapping[str, str],
        *,
        stream: bool,
        **callbacks: Any,
    ) -> HTTPRequest:
        """The upstream HTTP request: URL, headers, timeouts. Streams have no overall limit."""
        headers = {
            **auth_headers,
            "x-request-id": call.request_id,
            "x-ms-client-request-id": call.request_id,
            **call.trace_headers,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        elif target.method == "POST":
            body = b""
        return HTTPRequest(
            upstream_url(deployment, target.operation, item=target.item, query=target.query),
            method=target.method,
            body=body,
            headers=headers,
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
        self,
        deployment: Deployment,
        target: UpstreamTarget | str,
        body: bytes | None,
        call: UpstreamCall,
        *,
        parse: bool = True,
    ) -> UpstreamResponse | None:
        """Send a non-stream request; raise GatewayError for anything but a 200.

        None means the call was aborted (the caller went away). Without
        `parse`, the body is only checked to be an object, and `document` is empty.
        """
        target = UpstreamTarget.of(target)
        return await self._signed(
            deployment,
            lambda headers: self._complete(deployment, target, body, call, headers, parse),
        )

    async def _complete(
        self,
        deployment: Deployment,
        target: UpstreamTarget,
        body: bytes | None,
        call: UpstreamCall,
        auth_headers: Mapping[str, str],
        parse: bool,
    ) -> UpstreamResponse | None:
        request = self._request(deployment, target, body, call, auth_headers, stream=False)
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
        document: Any = {}
        if parse:
            try:
                document = json.loads(outcome.body)
            except ValueError:
                document = None
        elif not (outcome.body or b"").lstrip().startswith(b"{"):
            document = None
        if not isinstance(document, dict):
            raise invalid_success_body(outcome.headers)
        return UpstreamResponse(outcome.code, outcome.headers, outcome.body, document)

    async def open_stream(
        self,
        deployment: Deployment,
        target: UpstreamTarget | str,
        body: bytes | None,
        call: UpstreamCall,
        *,
        ends_stream: Callable[[bytes], bool] = is_done,
    ) -> UpstreamStream | None:
        """Send a stream request and wait for its first events.

        A failure before them is raised as GatewayError (so another
        deployment may be tried); after them, it ends the iteration (see
        `UpstreamStream`). None means the call was aborted (the caller went away).
        `ends_stream` tells the event after which the stream is complete.
        """
        target = UpstreamTarget.of(target)
        return await self._signed(
            deployment,
            lambda headers: self._open_stream(deployment, target, body, call, headers, ends_stream),
        )

    async def _open_stream(
        self,
        deployment: Deployment,
        target: UpstreamTarget,
        body: bytes | None,
        call: UpstreamCall,
        auth_headers: Mapping[str, str],
        ends_stream: Callable[[bytes], bool],
    ) -> UpstreamStream | None:
        stream = UpstreamStream(self, call, ends_stream)
        request = self._request(
            deployment,
            target,
            body,
            call,
            auth_headers,
            stream=True,
            header_callback=stream.on_header_line,
            streaming_callback=stream.on_chunk,
        )
        if call.abort_reason:
            return None
        self.streams.add(stream)
        try:
            await stream.start(request, self._fetch(request, call))
        except GatewayError:
            stream.release()  # its transfer is over; the call itself may be tried again
            raise
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
    def stream_keepalive(self) -> float:
        return self._settings.stream_keepalive

    @property
    def stream_idle_timeout(self) -> float:
        return self._settings.stream_idle_timeout

    @property
    def max_cooldown(self) -> float:
        return self._settings.max_cooldown


class UpstreamStream:
    """Azure's event stream: `async for events in stream` gives the whole events received
    since the previous step (a list of raw event bytes). An empty step means Azure has
    been silent for STREAM_KEEPALIVE seconds since the last one, so the caller can send
    a keep-alive; it is timed by the stream's one timer, not by each step.

    The iteration ends after the event `ends_stream` recognises (chat's
    `[DONE]`, a Responses terminal event). A stream that fails after its
    first events raises GatewayError from the iteration, once the events
    before the failure are taken; the caller ending it early calls `close()`.
    """

    def __init__(
        self,
        client: UpstreamClient,
        call: UpstreamCall,
        ends_stream: Callable[[bytes], bool] = is_done,
    ) -> None:
        self._client = client
        self.call = call
        self._ends_stream = ends_stream
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
        self.done = False  # the last event arrived
        self.started = False  # events were handed out
        self.ended = False  # the transfer is over
        self._transport_error: HTTPTransportError | None = None
        self._opened_at = self._last_activity = self._last_step = time.monotonic()
        self._silent = False  # a keep-alive step is due

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
        self.done = self._ends_stream(events[-1])
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
        keepalive = self._client.stream_keepalive
        if keepalive and self._timer is not None:  # from now on the timer keeps it too
            self._last_step = time.monotonic()
            self._timer.cancel()
            self._timer = self._loop.call_later(
                min(keepalive, self._client.stream_idle_timeout), self._check_timeouts
            )

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
            if self._silent:
                self._silent = False
                return []
            await self._wait()
        self._silent = False
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
        self._last_step = time.monotonic()
        return events

    def close(self) -> None:
        """Stop the transfer now (the caller went away or stopped reading)."""
        self.call.abort("client_gone")
        self.release()

    def release(self) -> None:
        """Let go of a stream whose transfer is over, leaving its call as it is."""
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
        if remaining <= 0:
            self._timer = None
            self.call.abort(reason)
            return
        keepalive = self._client.stream_keepalive
        if keepalive and self.status is not None:
            due = self._last_step + keepalive - now
            if due <= 0:
                self._silent = True
                self._last_step = now
                self._wake()
                due = keepalive
            remaining = min(remaining, due)
        self._timer = self._loop.call_later(remaining, self._check_timeouts)

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
