"""One kept-alive connection to an origin (and the CONNECT tunnel that may come first).

A `Connection` parses one answer at a time and talks to the pool that owns
it only through `ConnectionOwner`, and to the request it carries only
through `Transfer`: the pool never reads a connection's parser state, and a
connection never reaches into the pool's queues.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from tornado.httpclient import HTTPRequest
from tornado.httputil import HTTPHeaders, HTTPInputError, parse_response_start_line

from gateway.upstream.httpclient.wire import HTTPTransportError, describe_error, parse_header_lines

# A response head (status line and headers) longer than this is refused.
MAX_HEAD_SIZE = 64 * 1024

# What a chunked body expects next.
_SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)


class Transfer(Protocol):
    """The request a connection carries, as the connection sees it."""

    request: HTTPRequest
    outgoing: bytes  # the whole request: head and body
    finished: bool
    connection: Connection | None

    def fail(self, error: BaseException) -> None: ...

    def succeed(self, code: int, reason: str, headers: HTTPHeaders, body: bytes | None) -> None: ...


class ConnectionOwner(Protocol):
    """What a connection tells the pool that owns it, and the one limit it asks."""

    max_body_size: int

    def connection_opened(self, connection: Connection) -> None: ...

    def connection_closed(self, connection: Connection) -> None:
        """The connection is gone: forget it (it may have been idle)."""

    def connection_idle(self, connection: Connection) -> None:
        """The answer is complete and the connection may carry another request."""

    def resend(self, transfer: Transfer) -> bool:
        """Send `transfer` again on a new connection: this reused one was closed before
        any byte of the answer. False if the pool will not (it did once, or is closed)."""


class Tunnel(asyncio.Protocol):
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


class Connection(asyncio.Protocol):
    """One kept-alive connection to an origin, carrying one exchange at a time."""

    def __init__(self, owner: ConnectionOwner, origin: tuple[str, str, int]) -> None:
        self.owner = owner
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.exchange: Transfer | None = None
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
        self.owner.connection_opened(self)

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
        self.owner.connection_closed(self)
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
        if self.reused and not self.answered and self.owner.resend(exchange):
            return
        detail = f" ({describe_error(exc)})" if exc else ""
        exchange.fail(
            HTTPTransportError(
                HTTPTransportError.CLOSED,
                f"The server closed the connection before the answer ended{detail}.",
            )
        )

    # --- used by the client -----------------------------------------------

    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, exchange: Transfer, *, reused: bool) -> None:
        self.exchange = exchange
        exchange.connection = self
        self.reused = reused
        self.answered = False
        self._reset_parser()
        self.transport.write(exchange.outgoing)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        if not self.paused and self.usable():
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.usable():
                self.transport.resume_reading()  # type: ignore[union-attr]

    def abandon(self) -> None:
        """The transfer gave up (aborted, timed out): close without telling it."""
        self.exchange = None
        self.drop()

    def drop(self) -> None:
        """Close at once, unsent data and all; the connection is never reused."""
        if self.transport is not None:
            self.transport.abort()
        self.owner.connection_closed(self)

    # --- parsing ----------------------------------------------------------

    def _feed(self, exchange: Transfer, data: bytes) -> None:
        if not self.in_body:
            body = self._feed_head(exchange, data)
            if body is None:
                return
            data = body
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

    def _feed_head(self, exchange: Transfer, data: bytes) -> bytes | None:
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

    def _parse_head(self, exchange: Transfer, head: str) -> bool:
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
                self.remaining > self.owner.max_body_size
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

    def _deliver(self, exchange: Transfer, data: bytes) -> None:
        streaming_callback = exchange.request.streaming_callback
        if streaming_callback is not None:
            streaming_callback(data)
            return
        self.size += len(data)
        if self.size > self.owner.max_body_size:
            raise HTTPTransportError(
                HTTPTransportError.PROTOCOL, "The response body is over the size limit."
            )
        self.parts.append(data)

    def _complete(self, exchange: Transfer) -> None:
        self.exchange = None
        body = None if exchange.request.streaming_callback else b"".join(self.parts)
        code, reason, headers = self.code, self.reason, self.headers or HTTPHeaders()
        self.resume_reading()  # an idle connection must see the server's FIN
        if self.keep_alive and self.usable():
            self._reset_parser()
            self.owner.connection_idle(self)
        else:
            self.drop()
        exchange.succeed(code, reason, headers, body)
