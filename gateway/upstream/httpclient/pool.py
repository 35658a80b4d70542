"""An `AsyncHTTPClient` that keeps HTTP/1.1 connections alive, on the event loop's own transports.

Why our own: Tornado's simple client opens a new connection (a TCP and TLS
handshake to Azure) for every request; its curl client keeps connections
alive but spends more CPU around libcurl than the gateway spends on
everything else (every option set again per request, header lines parsed
one callback at a time, its own timers), and can only stop a transfer at
libcurl's next progress tick. This client does what the upstream calls
need and no more:

- Keep-alive: idle connections are pooled per origin and the most recently
  used is taken first, so a steady load keeps few connections warm. Never
  more than `max_clients` requests run (the rest wait in order) nor
  connections stay open (an idle one is closed to make room).
- A pooled connection the server closed while it sat idle is noticed when
  the server's FIN arrives; if the close races the request (no byte of an
  answer came back), the request is sent once more on a new connection, as
  curl does.
- `header_callback` gets every header line before `streaming_callback` gets
  the first body byte; `streaming_callback` gets one call per read from the
  socket, chunked framing removed, so events that arrived together are
  handed on together and none waits for a later read.
- `abort(request)` ends a request at once: its connection is dropped.
- `connect_timeout` bounds the TCP and TLS handshakes, `request_timeout`
  the whole request from `fetch()` on (0 = no limit, for streams whose
  timeouts the caller keeps).
- TLS with the system's trust store (or `ca_certs`), the host name checked
  unless `validate_cert` is False, and an optional client certificate.
- Proxies, given as urllib's mapping (`{"https": url, "http": url, "no":
  "host,..."}`; the gateway's settings read them from HTTPS_PROXY, HTTP_PROXY
  and NO_PROXY): an https origin through a `CONNECT` tunnel, an http one with
  absolute request URLs; `http://user:pass@host:port` proxies send Basic
  `Proxy-Authorization`.

A failure with no HTTP answer is an `HTTPTransportError` (code 599) whose
`kind` says what happened; `AsyncHTTPClient.fetch` raises it even with
`raise_error=False`. Left out, because the upstream never needs them:
redirects, compressed answers (no Accept-Encoding is sent), TLS to the proxy itself,
`Expect: 100-continue`, `body_producer` and pipelining.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from io import BytesIO
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders

from gateway.upstream.httpclient.connection import Connection, Tunnel
from gateway.upstream.httpclient.wire import (
    HTTPTransportError,
    Proxy,
    describe_error,
    parse_proxy_url,
    request_head,
    target_of,
)

DEFAULT_MAX_CLIENTS = 10
DEFAULT_MAX_BODY_SIZE = 100 * 1024 * 1024
# An idle connection older than this is closed rather than reused: servers
# and load balancers drop quiet connections after a few minutes, often
# without a FIN that would reach us.
IDLE_CONNECTION_TTL = 60.0


class KeepAliveHTTPClient(AsyncHTTPClient):
    """HTTP/1.1 with pooled keep-alive connections. See the module docstring."""

    def initialize(  # type: ignore[override]
        self,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        defaults: dict[str, Any] | None = None,
        proxies: dict[str, str] | None = None,
    ) -> None:
        """`proxies`: "http"/"https" -> proxy URL and "no" -> hosts that bypass it, as urllib's."""
        super().initialize(defaults=defaults)
        self.max_clients = max_clients
        self.max_body_size = max_body_size
        self._loop: asyncio.AbstractEventLoop = self.io_loop.asyncio_loop  # type: ignore[attr-defined]
        self._exchanges: dict[HTTPRequest, Exchange] = {}
        self._waiting: deque[Exchange] = deque()
        self._running = 0
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._open: set[Connection] = set()
        self._connecting = 0
        self._tls_contexts: dict[tuple, ssl.SSLContext] = {}
        self._proxies = dict(proxies or {})
        self._routes: dict[tuple[str, str, int], Proxy | None] = {}
        self._shut = False
        for scheme in ("http", "https"):
            if (
                scheme in self._proxies
            ):  # checked now: a bad proxy URL stops the start, not a request
                parse_proxy_url(self._proxies[scheme], f"{scheme}_proxy")

    def close(self) -> None:
        """Fail every request still running or waiting, and close every connection."""
        self._shut = True
        closed = HTTPTransportError(HTTPTransportError.ABORTED, "The HTTP client was closed.")
        for exchange in [*self._waiting, *self._exchanges.values()]:
            exchange.fail(closed)
        for connection in list(self._open):
            connection.drop()
        super().close()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def fetch_impl(self, request: HTTPRequest, callback: Callable[[HTTPResponse], None]) -> None:
        original = request.request  # type: ignore[attr-defined]  # fetch() hands a _RequestProxy
        exchange = Exchange(self, original, request, callback)
        self._exchanges[original] = exchange
        if request.request_timeout:
            exchange.deadline = self._loop.call_later(request.request_timeout, exchange.time_out)
        if self._running < self.max_clients:
            self._run(exchange)
        else:
            self._waiting.append(exchange)

    def proxy_for(self, origin: tuple[str, str, int]) -> Proxy | None:
        """The proxy an origin is reached through, if any (decided once per origin)."""
        if origin not in self._routes:
            scheme, host, _ = origin
            url = self._proxies.get(scheme)
            if url is None or urllib.request.proxy_bypass_environment(host, self._proxies):  # type: ignore[attr-defined]
                self._routes[origin] = None
            else:
                self._routes[origin] = parse_proxy_url(url, f"{scheme}_proxy")
        return self._routes[origin]

    def abort(self, request: HTTPRequest) -> bool:
        """End `request` now if it is running or waiting; its fetch fails with kind ABORTED."""
        exchange = self._exchanges.get(request)
        if exchange is None:
            return False
        exchange.fail(HTTPTransportError(HTTPTransportError.ABORTED, "The request was aborted."))
        return True

    def pause_reading(self, request: HTTPRequest) -> None:
        """Stop reading `request`'s answer from its socket until `resume_reading`.

        The server's writes then block once the kernel's buffers are full:
        how a caller that reads slowly holds Azure back.
        """
        exchange = self._exchanges.get(request)
        if exchange is not None and exchange.connection is not None:
            exchange.connection.pause_reading()

    def resume_reading(self, request: HTTPRequest) -> None:
        exchange = self._exchanges.get(request)
        if exchange is not None and exchange.connection is not None:
            exchange.connection.resume_reading()

    def _run(self, exchange: Exchange) -> None:
        self._running += 1
        exchange.running = True
        connection = self._pooled(exchange.target.origin)
        if connection is not None:
            connection.send(exchange, reused=True)
        else:
            exchange.connecting = self._loop.create_task(self._connect_and_send(exchange))

    def _pooled(self, origin: tuple[str, str, int]) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable() and now - connection.idle_since < IDLE_CONNECTION_TTL:
                return connection
            connection.drop()
        return None

    async def _connect_and_send(self, exchange: Exchange) -> None:
        request = exchange.request
        if len(self._open) + self._connecting >= self.max_clients:
            self._close_oldest_idle()
        self._connecting += 1
        try:
            async with asyncio.timeout(request.connect_timeout or None):
                connection = await self._connect(exchange.target.origin, exchange.via, request)
        except TimeoutError:
            exchange.fail(
                HTTPTransportError(HTTPTransportError.TIMEOUT, "Timeout while connecting.")
            )
            return
        except (OSError, ssl.SSLError) as error:
            exchange.fail(HTTPTransportError(HTTPTransportError.CONNECT, describe_error(error)))
            return
        finally:
            self._connecting -= 1
        exchange.connecting = None
        if exchange.finished:  # aborted or timed out just as the connection came up
            self.connection_idle(connection)
            return
        connection.send(exchange, reused=False)

    async def _connect(
        self, origin: tuple[str, str, int], via: Proxy | None, request: HTTPRequest
    ) -> Connection:
        scheme, host, port = origin
        context = self._tls_context(request) if scheme == "https" else None
        if via is None or context is None:
            address = (host, port) if via is None else (via.host, via.port)
            _, connection = await self._loop.create_connection(
                lambda: Connection(self, origin), *address, ssl=context
            )
            return connection
        transport, tunnel = await self._loop.create_connection(Tunnel, via.host, via.port)
        try:
            await tunnel.open(f"{host}:{port}", via.authorization)
            connection = Connection(self, origin)
            secure = await self._loop.start_tls(
                transport, connection, context, server_hostname=host
            )
        except BaseException:
            transport.abort()
            raise
        assert secure is not None  # start_tls gives None only when the loop is closing
        connection.connection_made(secure)
        return connection

    def _close_oldest_idle(self) -> None:
        oldest = min(
            (idle[0] for idle in self._idle.values() if idle),
            key=lambda connection: connection.idle_since,
            default=None,
        )
        if oldest is not None:
            self._idle[oldest.origin].remove(oldest)
            oldest.drop()

    def _tls_context(self, request: HTTPRequest) -> ssl.SSLContext:
        key = (request.validate_cert, request.ca_certs, request.client_cert, request.client_key)
        context = self._tls_contexts.get(key)
        if context is None:
            context = ssl.create_default_context(cafile=request.ca_certs)
            if not request.validate_cert:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
            if request.client_cert:
                context.load_cert_chain(request.client_cert, request.client_key)
            self._tls_contexts[key] = context
        return context

    def _retire(self, exchange: Exchange) -> None:
        """`exchange` has ended: free its slot for the next waiting request."""
        self._exchanges.pop(exchange.original, None)
        if exchange.running:
            exchange.running = False
            self._running -= 1
            if self._waiting and not self._shut:
                self._run(self._waiting.popleft())
        else:
            try:
                self._waiting.remove(exchange)
            except ValueError:
                pass

    # --- ConnectionOwner: what its connections tell the client ------------

    def connection_opened(self, connection: Connection) -> None:
        self._open.add(connection)

    def connection_idle(self, connection: Connection) -> None:
        if self._shut:
            connection.drop()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)

    def connection_closed(self, connection: Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    def resend(self, transfer: Any) -> bool:
        exchange: Exchange = transfer
        if exchange.retried or self._shut:
            return False
        exchange.retried = True
        exchange.connecting = self._loop.create_task(self._connect_and_send(exchange))
        return True


class Exchange:
    """One request from `fetch()` until its callback has its response."""

    def __init__(
        self,
        client: KeepAliveHTTPClient,
        original: HTTPRequest,
        request: HTTPRequest,
        callback: Callable[[HTTPResponse], None],
    ) -> None:
        self.client = client
        self.original = original
        self.request = request
        self.callback = callback
        self.target = target_of(request.url)
        self.via = client.proxy_for(self.target.origin)
        body = request.body or b""
        self.outgoing = request_head(request, self.target, body, self.via) + body
        self.start_time = time.time()
        self.started = time.monotonic()
        self.deadline: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task | None = None
        self.connection: Connection | None = None
        self.running = False
        self.retried = False
        self.finished = False

    def time_out(self) -> None:
        self.deadline = None
        self.fail(HTTPTransportError(HTTPTransportError.TIMEOUT, "Timeout during request."))

    def fail(self, error: BaseException) -> None:
        if self.finished:
            return
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        connection, self.connection = self.connection, None
        if connection is not None:
            connection.abandon()
        self._finish(
            HTTPResponse(
                self.original,
                599,
                error=error,
                request_time=self._elapsed(),
                start_time=self.start_time,
            )
        )

    def succeed(self, code: int, reason: str, headers: HTTPHeaders, body: bytes | None) -> None:
        self.connection = None
        self._finish(
            HTTPResponse(
                self.original,
                code,
                reason=reason,
                headers=headers,
                buffer=BytesIO(body) if body is not None else None,
                effective_url=self.request.url,
                request_time=self._elapsed(),
                start_time=self.start_time,
            )
        )

    def _elapsed(self) -> float:
        return time.monotonic() - self.started

    def _finish(self, response: HTTPResponse) -> None:
        self.finished = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.client._retire(self)
        self.callback(response)
