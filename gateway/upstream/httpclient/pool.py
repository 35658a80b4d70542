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
import base64
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable
from functools import lru_cache
from io import BytesIO
from typing import Any, NamedTuple
from urllib.parse import unquote, urlsplit

from tornado.httpclient import AsyncHTTPClient, HTTPClientError, HTTPRequest, HTTPResponse
from tornado.httputil import HTTPHeaders, HTTPInputError, parse_response_start_line

DEFAULT_MAX_CLIENTS = 10
DEFAULT_MAX_BODY_SIZE = 100 * 1024 * 1024
# A response head (status line and headers) longer than this is refused.
MAX_HEAD_SIZE = 64 * 1024
# An idle connection older than this is closed rather than reused: servers
# and load balancers drop quiet connections after a few minutes, often
# without a FIN that would reach us.
IDLE_CONNECTION_TTL = 60.0

# What a chunked body expects next.
_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class HTTPTransportError(HTTPClientError):
    """No HTTP answer came: the connection failed, was lost or timed out, or the answer was garbled."""

    CONNECT = "connect"  # refused, unresolvable, TLS handshake or certificate failure
    TIMEOUT = "timeout"  # connect_timeout or request_timeout
    CLOSED = "closed"  # the server closed or reset the connection before the answer ended
    PROTOCOL = "protocol"  # not HTTP/1.x, a malformed head or framing, a body over the limit
    ABORTED = "aborted"  # abort(), or the client was closed

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(599, message)
        self.kind = kind


def parse_header_lines(lines: Iterable[str]) -> HTTPHeaders:
    """Header lines ("Name: value", without line ends) as HTTPHeaders.

    Twice as fast as `HTTPHeaders.parse`, which runs a regular expression
    over every line, and as strict: no folded lines, no stray CR or LF.
    """
    headers = HTTPHeaders()
    for line in lines:
        name, colon, value = line.partition(":")
        if (
            not colon
            or not name
            or name[-1] in " \t"
            or name[0] in " \t"
            or "\r" in line
            or "\n" in line
        ):
            raise HTTPInputError(f"Malformed header line {line[:80]!r}")
        headers.add(name, value.strip(" \t"))
    return headers


class _Target(NamedTuple):
    origin: tuple[str, str, int]  # scheme, host, port: what a pooled connection serves
    host_header: str
    path: str


@lru_cache(maxsize=512)
def _target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"Not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host_header = parts.netloc.rpartition("@")[2]
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target((parts.scheme, parts.hostname, port), host_header, path)


class _Proxy(NamedTuple):
    host: str
    port: int
    authorization: str | None  # the Proxy-Authorization value


def parse_proxy_url(url: str, variable: str) -> _Proxy:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"{variable}: only http:// proxies are supported (got {parts.scheme}://)")
    authorization = None
    if parts.username is not None:
        credentials = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        authorization = "Basic " + base64.b64encode(credentials.encode()).decode()
    return _Proxy(parts.hostname, parts.port or 80, authorization)


def _request_head(request: HTTPRequest, target: _Target, body: bytes, via: _Proxy | None) -> bytes:
    scheme = target.origin[0]
    if via is not None and scheme == "http":  # a plain proxy takes the absolute URL
        lines = [f"{request.method} http://{target.host_header}{target.path} HTTP/1.1"]
        if via.authorization:
            lines.append(f"Proxy-Authorization: {via.authorization}")
    else:
        lines = [f"{request.method} {target.path} HTTP/1.1"]
    lines.append(f"Host: {target.host_header}")
    if request.user_agent and "User-Agent" not in request.headers:
        lines.append(f"User-Agent: {request.user_agent}")
    for name, value in request.headers.get_all():
        if name in ("Host", "Content-Length", "Transfer-Encoding"):
            continue
        if "\r" in value or "\n" in value:
            raise ValueError(f"The request header {name} contains a line break.")
        lines.append(f"{name}: {value}")
    if body or request.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin1")


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
        self._exchanges: dict[HTTPRequest, _Exchange] = {}
        self._waiting: deque[_Exchange] = deque()
        self._running = 0
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._tls_contexts: dict[tuple, ssl.SSLContext] = {}
        self._proxies = dict(proxies or {})
        self._routes: dict[tuple[str, str, int], _Proxy | None] = {}
        for scheme in ("http", "https"):
            if (
                scheme in self._proxies
            ):  # checked now: a bad proxy URL stops the start, not a request
                parse_proxy_url(self._proxies[scheme], f"{scheme}_proxy")

    def close(self) -> None:
        """Fail every request still running or waiting, and close every connection."""
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
        exchange = _Exchange(self, original, request, callback)
        self._exchanges[original] = exchange
        if request.request_timeout:
            exchange.deadline = self._loop.call_later(request.request_timeout, exchange.time_out)
        if self._running < self.max_clients:
            self._run(exchange)
        else:
            self._waiting.append(exchange)

    def proxy_for(self, origin: tuple[str, str, int]) -> _Proxy | None:
        """The proxy an origin is reached through, if any (decided once per origin)."""
        if origin not in self._routes:
            scheme, host, _ = origin
            url = self._proxies.get(scheme)
            bypass = url is None or urllib.request.proxy_bypass_environment(host, self._proxies)
            self._routes[origin] = None if bypass else parse_proxy_url(url, f"{scheme}_proxy")
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

    def _run(self, exchange: _Exchange) -> None:
        self._running += 1
        exchange.running = True
        connection = self._pooled(exchange.target.origin)
        if connection is not None:
            connection.send(exchange, reused=True)
        else:
            exchange.connecting = self._loop.create_task(self._connect_and_send(exchange))

    def _pooled(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable() and now - connection.idle_since < IDLE_CONNECTION_TTL:
                return connection
            connection.drop()
        return None

    async def _connect_and_send(self, exchange: _Exchange) -> None:
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
            exchange.fail(HTTPTransportError(HTTPTransportError.CONNECT, _describe(error)))
            return
        finally:
            self._connecting -= 1
        exchange.connecting = None
        if exchange.finished:  # aborted or timed out just as the connection came up
            self._park(connection)
            return
        connection.send(exchange, reused=False)

    async def _connect(
        self, origin: tuple[str, str, int], via: _Proxy | None, request: HTTPRequest
    ) -> _Connection:
        scheme, host, port = origin
        context = self._tls_context(request) if scheme == "https" else None
        if via is None or context is None:
            address = (host, port) if via is None else (via.host, via.port)
            _, connection = await self._loop.create_connection(
                lambda: _Connection(self, origin), *address, ssl=context
            )
            return connection
        transport, tunnel = await self._loop.create_connection(_Tunnel, via.host, via.port)
        try:
            await tunnel.open(f"{host}:{port}", via.authorization)
            connection = _Connection(self, origin)
            secure = await self._loop.start_tls(
                transport, connection, context, server_hostname=host
            )
        except BaseException:
            transport.abort()
            raise
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

    def _retire(self, exchange: _Exchange) -> None:
        """`exchange` has ended: free its slot for the next waiting request."""
        self._exchanges.pop(exchange.original, None)
        if exchange.running:
            exchange.running = False
            self._running -= 1
            if self._waiting and not self._closed:
                self._run(self._waiting.popleft())
        else:
            try:
                self._waiting.remove(exchange)
            except ValueError:
                pass

    def _park(self, connection: _Connection) -> None:
        connection.idle_since = time.monotonic()
        self._idle.setdefault(connection.origin, []).append(connection)

    def _forget(self, connection: _Connection) -> None:
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)


def _describe(error: BaseException) -> str:
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


class _Exchange:
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
        self.target = _target(request.url)
        self.via = client.proxy_for(self.target.origin)
        body = request.body or b""
        self.bytes = _request_head(request, self.target, body, self.via) + body
        self.start_time = time.time()
        self.started = time.monotonic()
        self.deadline: asyncio.TimerHandle | None = None
        self.connecting: asyncio.Task | None = None
        self.connection: _Connection | None = None
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
            connection.exchange = None
            connection.drop()
        self._finish(HTTPResponse(self.original, 599, error=error, **self._times()))

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
                **self._times(),
            )
        )

    def _times(self) -> dict[str, float]:
        return {"request_time": time.monotonic() - self.started, "start_time": self.start_time}

    def _finish(self, response: HTTPResponse) -> None:
        self.finished = True
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None
        self.client._retire(self)
        self.callback(response)


class _Tunnel(asyncio.Protocol):
    """The CONNECT exchange with a proxy, before TLS starts on the same socket."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def open(self, authority: str, authorization: str | None) -> None:
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if authorization:
            lines.append(f"Proxy-Authorization: {authorization}")
        self.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin1"))  # type: ignore[union-attr]
        first = (await self.answer).partition("\r\n")[0]
        try:
            code = parse_response_start_line(first).code
        except HTTPInputError:
            code = 0
        if not 200 <= code < 300:
            raise ConnectionError(f"the proxy refused the tunnel to {authority}: {first[:80]!r}")

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end >= 0 and end + 4 < len(self.buffer):
            self.answer.set_exception(
                ConnectionError("the proxy sent bytes after its CONNECT answer")
            )
        elif end >= 0:
            self.answer.set_result(self.buffer[:end].decode("latin1"))
        elif len(self.buffer) > MAX_HEAD_SIZE:
            self.answer.set_exception(ConnectionError("the proxy's CONNECT answer is too long"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(ConnectionError("the proxy closed the connection"))


class _Connection(asyncio.Protocol):
    """One kept-alive connection to an origin, carrying one exchange at a time."""

    def __init__(self, client: KeepAliveHTTPClient, origin: tuple[str, str, int]) -> None:
        self.client = client
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.exchange: _Exchange | None = None
        self.idle_since = 0.0
        self.reused = False
        self.answered = False
        self.paused = False
        self._reset_parser()

    def _reset_parser(self) -> None:
        self.buffer = b""
        self.in_body = False
        self.code = 0
        self.reason = ""
        self.headers: HTTPHeaders | None = None
        self.keep_alive = True
        self.chunked = False
        self.remaining: int | None = None  # body bytes still due; None = until the server closes
        self.chunk_state = _SIZE  # chunked: what is due next
        self.chunk_left = 0  # chunked: data bytes left in the current chunk
        self.parts: list[bytes] = []
        self.size = 0

    # --- asyncio.Protocol -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.client._open.add(self)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes on an idle connection: nothing can be trusted on it now.
            self.drop()
            return
        self.answered = True
        try:
            self._feed(exchange, data)
        except HTTPTransportError as error:
            exchange.fail(error)
        except Exception as error:  # a callback's own failure ends its request, as in Tornado
            exchange.fail(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._forget(self)
        if (
            self.exchange is not None
            and self.in_body
            and self.remaining is None
            and not self.chunked
        ):
            self._complete(self.exchange)  # a body without framing ends where the connection does
        exchange, self.exchange = self.exchange, None
        if exchange is None or exchange.finished:
            return
        exchange.connection = None
        if self.reused and not self.answered and not exchange.retried and not self.client._closed:
            exchange.retried = True
            exchange.connecting = self.client._loop.create_task(
                self.client._connect_and_send(exchange)
            )
            return
        detail = f" ({_describe(exc)})" if exc else ""
        exchange.fail(
            HTTPTransportError(
                HTTPTransportError.CLOSED,
                f"The server closed the connection before the answer ended{detail}.",
            )
        )

    # --- used by the client -----------------------------------------------

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, exchange: _Exchange, *, reused: bool) -> None:
        self.exchange = exchange
        exchange.connection = self
        self.reused = reused
        self.answered = False
        self._reset_parser()
        self.transport.write(exchange.bytes)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        if not self.paused and self.usable():
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.usable():
                self.transport.resume_reading()  # type: ignore[union-attr]

    def drop(self) -> None:
        """Close at once, unsent data and all; the connection is never reused."""
        if self.transport is not None:
            self.transport.abort()
        self.client._forget(self)

    # --- parsing ----------------------------------------------------------

    def _feed(self, exchange: _Exchange, data: bytes) -> None:
        if not self.in_body:
            data = self._feed_head(exchange, data)
            if data is None:
                return
        if self.chunked:
            data = self._unchunk(data)
        elif self.remaining is not None:
            if len(data) > self.remaining:
                self.keep_alive = False  # more than announced: the connection is out of step
                data = data[: self.remaining]
            self.remaining -= len(data)
        if data:
            self._deliver(exchange, data)
        ended = self.chunk_state == _DONE if self.chunked else self.remaining == 0
        if ended:
            self._complete(exchange)

    def _feed_head(self, exchange: _Exchange, data: bytes) -> bytes | None:
        """Take the response head from the front of `data`; the body bytes after it, or None."""
        while True:
            buffer = self.buffer + data if self.buffer else data
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_SIZE:
                    raise HTTPTransportError(
                        HTTPTransportError.PROTOCOL, "The response head is too long."
                    )
                self.buffer = buffer
                return None
            self.buffer = b""
            head, data = buffer[:end].decode("latin1"), buffer[end + 4 :]
            if self._parse_head(exchange, head):
                return data

    def _parse_head(self, exchange: _Exchange, head: str) -> bool:
        """Parse one head; False for an interim (1xx) one, which has no body."""
        first, _, rest = head.partition("\r\n")
        try:
            start = parse_response_start_line(first)
            headers = parse_header_lines(rest.split("\r\n") if rest else ())
        except HTTPInputError:
            raise HTTPTransportError(
                HTTPTransportError.PROTOCOL, f"Not an HTTP/1.x response: {first[:80]!r}."
            ) from None
        if 100 <= start.code < 200:
            return False
        self.code, self.reason, self.headers = start.code, start.reason, headers
        connection = headers.get("Connection", "").lower()
        if start.version == "HTTP/1.0":
            self.keep_alive = "keep-alive" in connection
        else:
            self.keep_alive = "close" not in connection
        self.in_body = True
        if exchange.request.method == "HEAD" or start.code in (204, 304):
            self.remaining = 0
        elif "chunked" in headers.get("Transfer-Encoding", "").lower():
            self.chunked = True
        elif "Content-Length" in headers:
            try:
                self.remaining = int(headers["Content-Length"])
            except ValueError:
                raise HTTPTransportError(
                    HTTPTransportError.PROTOCOL, "The response has a malformed Content-Length."
                ) from None
            if (
                self.remaining > self.client.max_body_size
                and exchange.request.streaming_callback is None
            ):
                raise HTTPTransportError(
                    HTTPTransportError.PROTOCOL, "The response body is over the size limit."
                )
        else:
            self.keep_alive = False
        header_callback = exchange.request.header_callback
        if header_callback is not None:
            header_callback(f"{first}\r\n")
            for name, value in headers.get_all():
                header_callback(f"{name}: {value}\r\n")
            header_callback("\r\n")
        return True

    def _unchunk(self, data: bytes) -> bytes:
        """Remove chunked framing from `data`; the state says what is due next."""
        buffer = self.buffer + data if self.buffer else data
        self.buffer = b""
        pieces = []
        position = 0
        size = len(buffer)
        while position < size and self.chunk_state != _DONE:
            if self.chunk_state == _DATA:
                piece = buffer[position : position + self.chunk_left]
                pieces.append(piece)
                self.chunk_left -= len(piece)
                position += len(piece)
                if self.chunk_left == 0:
                    self.chunk_state = _DATA_END
                continue
            line_end = buffer.find(b"\r\n", position)
            if line_end < 0:
                self.buffer = buffer[position:]
                if len(self.buffer) > MAX_HEAD_SIZE:
                    raise HTTPTransportError(
                        HTTPTransportError.PROTOCOL, "A chunk line is too long."
                    )
                break
            line = buffer[position:line_end]
            position = line_end + 2
            if self.chunk_state == _SIZE:
                try:
                    length = int(line.partition(b";")[0], 16)
                except ValueError:
                    raise HTTPTransportError(
                        HTTPTransportError.PROTOCOL, "Malformed chunk size in the response."
                    ) from None
                end = position + length
                if length and buffer[end : end + 2] == b"\r\n":
                    # The whole chunk is here: take it in one step (the usual case).
                    pieces.append(buffer[position:end])
                    position = end + 2
                elif length:
                    self.chunk_state, self.chunk_left = _DATA, length
                else:
                    self.chunk_state = _TRAILERS
            elif self.chunk_state == _DATA_END:
                if line:
                    raise HTTPTransportError(
                        HTTPTransportError.PROTOCOL, "Malformed chunked framing."
                    )
                self.chunk_state = _SIZE
            elif not line:  # the empty line that ends the trailers
                self.chunk_state = _DONE
        if self.chunk_state == _DONE and position < size:
            self.keep_alive = False  # bytes after the answer: the connection is out of step
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _deliver(self, exchange: _Exchange, data: bytes) -> None:
        streaming_callback = exchange.request.streaming_callback
        if streaming_callback is not None:
            streaming_callback(data)
            return
        self.size += len(data)
        if self.size > self.client.max_body_size:
            raise HTTPTransportError(
                HTTPTransportError.PROTOCOL, "The response body is over the size limit."
            )
        self.parts.append(data)

    def _complete(self, exchange: _Exchange) -> None:
        self.exchange = None
        body = None if exchange.request.streaming_callback else b"".join(self.parts)
        code, reason, headers = self.code, self.reason, self.headers or HTTPHeaders()
        self.resume_reading()  # an idle connection must see the server's FIN
        if self.keep_alive and self.usable() and not self.client._closed:
            self._reset_parser()
            self.client._park(self)
        else:
            self.drop()
        exchange.succeed(code, reason, headers, body)
