"""Servers on 127.0.0.1 that a test scripts byte by byte."""

from __future__ import annotations

import asyncio
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
