"""Streams respect a slow reader: the gateway holds at most STREAM_BUFFER_LIMIT bytes of one.

A scripted upstream (`EventFirehose`) writes a long event stream as fast as
its connection takes it; the caller reads it at 64 KiB/s. The gateway must
stop reading from the upstream (whose writes then block) rather than buffer
the answer, and the caller must still get every byte, in order.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.upstream.client import STREAM_BUFFER_LIMIT

from .conftest import server_env
from .support.loopback import Dechunker, EventFirehose, event_stream

SLOW_RATE = 64 * 1024  # bytes a second
SLOW_STEP = 0.25  # seconds between two slow reads
SLOW_SECONDS = 3.0
# The caller's receive buffer: small, so its kernel holds little of the stream.
RECEIVE_BUFFER = 64 * 1024
EVENT_SIZE = 4096
READ_TIMEOUT = 60.0


class StreamReader:
    """A caller of POST /v1/chat/completions with `stream: true`, reading at its own pace."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received = bytearray()
        self.body_bytes = 0
        self.dechunker = Dechunker()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self, keep: bool = True) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self.reader, self.writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        body = json.dumps(
            {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "go"}]}
        ).encode()
        self.writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        )
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200 "), head
        assert b"transfer-encoding: chunked" in head.lower()
        self._keep = keep

    def _take(self, data: bytes) -> None:
        events = self.dechunker.feed(data)
        self.body_bytes += len(events)
        if self._keep:
            self.received += events

    async def read_slowly(self, seconds: float, step: float = SLOW_STEP) -> None:
        assert self.reader is not None
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._take(
                await asyncio.wait_for(self.reader.read(int(SLOW_RATE * step)), READ_TIMEOUT)
            )
            await asyncio.sleep(step)  # the caller's pace, not a synchronisation

    async def read_rest(self) -> None:
        assert self.reader is not None and self.writer is not None
        while not self.dechunker.done:
            data = await asyncio.wait_for(self.reader.read(256 * 1024), READ_TIMEOUT)
            assert data, "the gateway closed the stream before its end"
            self._take(data)
        self.writer.close()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def firehose(io_loop: Any, request: pytest.FixtureRequest) -> Any:
    total = request.param
    server = EventFirehose(event_stream(total, EVENT_SIZE))
    io_loop.run_sync(server.start)
    yield server
    io_loop.run_sync(server.stop)


@pytest.mark.parametrize("firehose", [20 * 1024 * 1024], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_a_slow_reader_holds_the_upstream_back_and_gets_every_byte(start_gateway, firehose):
    gateway = start_gateway(ENDPOINT=firehose.url)
    upstream_client = gateway.server.pipeline.upstream
    caller = StreamReader(gateway.server.ports["http"])
    await caller.open()

    highest = 0
    deadline = time.monotonic() + SLOW_SECONDS
    while time.monotonic() < deadline:
        await caller.read_slowly(SLOW_STEP)
        highest = max(highest, upstream_client.buffered_bytes())
    progress = firehose.streams[0]
    # Held back: the upstream's writes block, far from the end of its answer.
    assert progress.blocked.is_set()
    assert not progress.finished and progress.written < firehose.total / 2
    assert 0 < highest <= STREAM_BUFFER_LIMIT
    assert len(caller.received) < 2 * SLOW_RATE * SLOW_SECONDS

    await caller.read_rest()
    assert bytes(caller.received) == b"".join(event_stream(firehose.total, EVENT_SIZE))
    assert upstream_client.buffered_bytes() == 0


READERS = 200


@pytest.mark.parametrize("firehose", [6 * 1024 * 1024], indirect=True)
@pytest.mark.gen_test(timeout=180)
async def test_200_slow_readers_at_once_keep_the_gateways_memory_bounded(tmp_path, spawn, firehose):
    env = server_env(
        tmp_path,
        HTTP_PORT="0",
        ENDPOINT=firehose.url,
        DEPLOYMENT_NAME="gpt-4o",
        API_VERSION="2024-10-21",
        KEY="upstream-key",
        LOG_FORMAT="json",
    )
    server = spawn(env)
    port = int(server.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
    warm = StreamReader(port)
    await warm.open(keep=False)
    await warm.read_rest()
    before = rss_bytes(server.proc.pid)

    readers = [StreamReader(port) for _ in range(READERS)]
    await asyncio.gather(*(reader.open(keep=False) for reader in readers))
    # Every upstream answer is held back before any caller reads on.
    for progress in firehose.streams[1:]:
        await asyncio.wait_for(progress.blocked.wait(), READ_TIMEOUT)
    await asyncio.gather(*(reader.read_slowly(1.0) for reader in readers))
    held = rss_bytes(server.proc.pid) - before
    # Without back-pressure the gateway would hold most of 200 x 6 MiB.
    assert held <= READERS * STREAM_BUFFER_LIMIT + 64 * 1024 * 1024, held

    await asyncio.gather(*(reader.read_rest() for reader in readers))
    assert all(reader.body_bytes == firehose.total for reader in readers)


@pytest.mark.parametrize("firehose", [20 * 1024 * 1024], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_time_held_back_by_a_slow_reader_is_not_azure_being_idle(start_gateway, firehose):
    gateway = start_gateway(ENDPOINT=firehose.url, STREAM_IDLE_TIMEOUT="1")
    caller = StreamReader(gateway.server.ports["http"])
    await caller.open()
    await asyncio.wait_for(firehose.streams[0].blocked.wait(), READ_TIMEOUT)
    await caller.read_slowly(3.0, step=1.0)  # three times the idle timeout, reading little
    await caller.read_rest()
    assert bytes(caller.received) == b"".join(event_stream(firehose.total, EVENT_SIZE))


@pytest.mark.parametrize("firehose", [20 * 1024 * 1024], indirect=True)
@pytest.mark.gen_test(timeout=120)
async def test_a_slow_reader_that_leaves_stops_the_held_back_upstream(start_gateway, firehose):
    gateway = start_gateway(ENDPOINT=firehose.url)
    caller = StreamReader(gateway.server.ports["http"])
    await caller.open()
    await asyncio.wait_for(firehose.streams[0].blocked.wait(), READ_TIMEOUT)
    await caller.read_slowly(SLOW_STEP)
    assert caller.writer is not None
    caller.writer.transport.abort()
    await asyncio.wait_for(firehose.closed.wait(), 5)  # the gateway closed its upstream call
    assert not firehose.streams[0].finished
    assert gateway.server.pipeline.upstream.buffered_bytes() == 0
