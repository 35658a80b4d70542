"""Servers on 127.0.0.1 that a test scripts byte by byte."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def reply(raw: bytes) -> Answer:
    async def answer(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await writer.drain()

    return answer


def ok(body: bytes = b"ok", *extra: str) -> Answer:
    head = "\r\n".join(["HTTP/1.1 200 OK", f"Content-Length: {len(body)}", *extra])
    return reply(head.encode() + b"\r\n\r\n" + body)


class LoopbackServer:
    """A server on 127.0.0.1 for one test: counts connections, ends every one at `stop`."""

    def __init__(self) -> None:
        self.connections = 0
        self.closed = asyncio.Event()  # set when a connection has ended
        self.server: asyncio.Server | None = None
        self.handlers: dict[asyncio.Task, asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.url

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()
        for writer in self.handlers.values():
            writer.transport.abort()  # each handler then ends on its own
        await asyncio.gather(*self.handlers, return_exceptions=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.handlers[asyncio.current_task()] = writer
        try:
            await self.handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.transport.abort()
            del self.handlers[asyncio.current_task()]
            self.closed.set()


class ScriptedServer(LoopbackServer):
    """An HTTP/1.1 server whose answers are queued by the test, one per request, in order.

    An answer writes whatever bytes it likes; `close` after it ends the
    connection. With no answer queued, `ok()` is sent. It counts the
    connections it accepted and keeps the raw requests it read.
    """

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[Answer, bool]] = []
        self.requests: list[bytes] = []
        self.request_seen = asyncio.Event()

    def queue(self, answer: Answer, *, close: bool = False) -> None:
        self.answers.append((answer, close))

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            request = head + await reader.readexactly(length)
            self.requests.append(request)
            self.request_seen.set()
            answer, close = self.answers.pop(0) if self.answers else (ok(), False)
            await answer(reader, writer)
            if close:
                return


def event_stream(total: int, event_size: int) -> list[bytes]:
    """Chat-completion chunk events of `event_size` bytes, `total` bytes in all, then [DONE].

    Each carries its sequence number, so a reader can tell order and loss.
    """
    events = []
    for seq in range(max(1, total // event_size)):
        head = b'data: {"seq":%d,"choices":[{"delta":{"content":"' % seq
        tail = b'"}}]}\n\n'
        events.append(head + b"x" * (event_size - len(head) - len(tail)) + tail)
    return [*events, b"data: [DONE]\n\n"]


class StreamProgress:
    """How far one answer of `EventFirehose` got, and whether its writes ever blocked."""

    def __init__(self) -> None:
        self.written = 0  # event bytes handed to the socket
        self.finished = False
        self.blocked = asyncio.Event()  # the kernel would take no more: the reader held us back


class EventFirehose(LoopbackServer):
    """Answers every request with `events`, chunked, written as fast as the connection takes.

    `SO_SNDBUF` is kept small, so a gateway that stops reading shows at once as
    writes that block (`StreamProgress.blocked`).
    """

    SEND_BUFFER = 64 * 1024
    WRITE_SIZE = 64 * 1024

    def __init__(self, events: list[bytes]) -> None:
        super().__init__()
        self.writes = []
        batch: list[bytes] = []
        for event in events:
            batch.append(event)
            if sum(map(len, batch)) >= self.WRITE_SIZE or event is events[-1]:
                data = b"".join(batch)
                self.writes.append((b"%x\r\n" % len(data)) + data + b"\r\n")
                batch = []
        self.total = sum(map(len, events))
        self.streams: list[StreamProgress] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.SEND_BUFFER)
        while True:  # a kept-alive connection carries one request after another
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            progress = StreamProgress()
            self.streams.append(progress)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n"
            )
            for data in self.writes:
                writer.write(data)
                progress.written += len(data)
                if writer.transport.get_write_buffer_size():
                    progress.blocked.set()
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            progress.finished = True


class Dechunker:
    """Removes HTTP/1.1 chunked framing from a body fed in pieces."""

    def __init__(self) -> None:
        self._buffer = b""
        self._left = 0  # data bytes left in the current chunk
        self._crlf_due = False  # the CRLF after a chunk's data
        self.done = False

    def feed(self, data: bytes) -> bytes:
        self._buffer += data
        out = []
        while not self.done:
            if self._left:
                piece = self._buffer[: self._left]
                if not piece:
                    break
                out.append(piece)
                self._left -= len(piece)
                self._buffer = self._buffer[len(piece) :]
                self._crlf_due = not self._left
            elif self._crlf_due:
                if len(self._buffer) < 2:
                    break
                assert self._buffer[:2] == b"\r\n", "malformed chunked framing"
                self._buffer = self._buffer[2:]
                self._crlf_due = False
            else:
                end = self._buffer.find(b"\r\n")
                if end < 0:
                    break
                self._left = int(self._buffer[:end], 16)
                self._buffer = self._buffer[end + 2 :]
                self.done = not self._left
        return b"".join(out)
