"""A fast Azure OpenAI stand-in for the benchmark: the emulator's bytes, none of its cost.

    python bench/fast_upstream.py [--port 0] [--key KEY]

A bare asyncio protocol (uvloop's loop when it is installed) that answers
POST .../chat/completions with bytes made once, at start-up, by
`emulator` itself, for a prompt of 18 words: a `chat.completion` JSON
of the emulator's shape, or the emulator's event stream with 20 content events
(23 `data:` events in all with the prompt-filter event, the role event and the
finish event, a usage event when the body asks for `include_usage`, then
`data: [DONE]`), each event in its own chunk and its own write, as the
emulator flushes them. The answer does not depend on the prompt sent. Headers are the emulator's too
(apim-request-id, x-ms-region, the echoed x-request-id).

Control routes (GET, on the same port; none is seen by the gateway):

    /_bench/stats    {"connections_accepted", "connections_open", "requests",
                      "streams_open", "streams_held"}
    /_bench/config   ?gap_ms=100&hold=0&pad=0: set how streams are sent from now
                     on: gap_ms between events; hold=N sends N events, then waits
                     for /_bench/release; pad=N makes each content event carry
                     N bytes of content. No parameters: back to the fast mode.
    /_bench/release  let every held stream finish
    /_bench/sent     ?id=X: [[time.monotonic_ns (system-wide), crc32 of the event]]
                     for each event of the stream whose x-request-id was X, when
                     it left this process. Recorded only in gap/hold/pad mode,
                     for the last 5,000 streams.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import email.utils
import json
import os
import re
import resource
import sys
import time
import urllib.parse
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from emulator.chat import (  # noqa: E402  (needs ROOT on sys.path)
    completion_body,
    plan_choices,
    stream_payloads,
)

DEFAULT_KEY = "bench-key"
MODEL = "gpt-4o-2024-08-06"
# 18 words: "You said:" plus these make 20 content events.
PROMPT = (
    "one two three four five six seven eight nine ten "
    "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"
)
REQUEST = {"messages": [{"role": "user", "content": PROMPT}]}
STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')
SENT_KEPT = 5000


def make_payloads(pad: int = 0, usage: bool = False) -> list[bytes]:
    """The emulator's `data:` events for REQUEST, content events padded to `pad` bytes if asked.

    `usage`: the request asked for `stream_options.include_usage` (the gateway
    does, to count tokens): every chunk has `"usage":null` and a usage chunk
    comes before [DONE], as the emulator (and Azure) send them.
    """
    request = {**REQUEST, "stream_options": {"include_usage": True}} if usage else REQUEST
    choices = plan_choices(request)
    payloads = stream_payloads(request, choices, "chatcmpl-emu-1", MODEL)
    events = []
    for payload in payloads:
        if pad and payload != "[DONE]":
            chunk = json.loads(payload)
            delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
            if delta.get("content"):
                delta["content"] = " " + "x" * (pad - 1)
                payload = json.dumps(chunk, separators=(",", ":"))
        events.append(f"data: {payload}\n\n".encode())
    return events


def frame_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


COMPLETION = json.dumps(
    completion_body(REQUEST, plan_choices(REQUEST), "chatcmpl-emu-1", MODEL)
).encode()
EVENTS = {usage: make_payloads(0, usage) for usage in (False, True)}
FRAMED_EVENTS = {
    usage: [frame_chunk(event) for event in events] for usage, events in EVENTS.items()
}
LAST_CHUNK = b"0\r\n\r\n"
CONTENT_EVENTS = sum(1 for event in EVENTS[False] if b'"delta":{"content":"' in event)
INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')


class State:
    def __init__(self, key: bytes) -> None:
        self.key = key
        self.connections_accepted = 0
        self.connections_open = 0
        self.requests = 0
        self.streams_open = 0
        self.streams_held = 0
        self.gap = 0.0
        self.hold: int | None = None
        self.pad = 0
        self.events = EVENTS
        self.release = asyncio.Event()
        self.sent: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._date_second = -1
        self._date = b""
        self._apim = 0

    def date(self) -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True).encode()
        return self._date

    def apim_id(self) -> bytes:
        self._apim += 1
        return b"00000000-0000-4000-8000-%012x" % self._apim

    def configure(self, query: dict[str, str]) -> dict:
        self.gap = float(query.get("gap_ms", 0)) / 1000
        self.hold = int(query["hold"]) if int(query.get("hold", 0) or 0) > 0 else None
        self.pad = int(query.get("pad", 0))
        self.events = (
            {usage: make_payloads(self.pad, usage) for usage in (False, True)}
            if self.pad
            else EVENTS
        )
        return {"gap_ms": self.gap * 1000, "hold": self.hold, "pad": self.pad}

    @property
    def slow(self) -> bool:
        return bool(self.gap or self.hold or self.pad)

    def record_sent(self, request_id: str) -> list[list[int]]:
        times: list[list[int]] = []
        self.sent[request_id] = times
        while len(self.sent) > SENT_KEPT:
            self.sent.popitem(last=False)
        return times


def json_response(obj: object, status: bytes = b"200 OK") -> bytes:
    body = json.dumps(obj).encode()
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        len(body),
        body,
    )


class UpstreamProtocol(asyncio.Protocol):
    """One keep-alive connection; requests on it are answered in order."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None
        self.continued = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections_accepted += 1
        self.state.connections_open += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.connections_open -= 1
        if self.task is not None:
            self.task.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.process()

    def process(self) -> None:
        while self.task is None and self.transport is not None:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buffer[:end]).split(b"\r\n")
            try:
                method, target, _version = lines[0].split(b" ", 2)
            except ValueError:
                self.fail(b"400 Bad Request")
                return
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
                self.fail(b"501 Not Implemented")
                return
            length = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + length:
                if headers.get(b"expect", b"").lower() == b"100-continue" and not self.continued:
                    self.continued = True
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                return
            body = bytes(self.buffer[end + 4 : end + 4 + length])
            del self.buffer[: end + 4 + length]
            self.continued = False
            self.handle(method, target, headers, body)

    def fail(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(json_response({"error": status.decode()}, status))
        self.transport.close()

    def handle(self, method: bytes, target: bytes, headers: dict, body: bytes) -> None:
        state, transport = self.state, self.transport
        assert transport is not None
        if target.startswith(b"/_bench/"):
            transport.write(self.control(target.decode()))
            return
        if method != b"POST" or b"/chat/completions" not in target:
            transport.write(
                json_response(
                    {"error": {"code": "404", "message": "Resource not found"}}, b"404 Not Found"
                )
            )
            return
        if headers.get(b"api-key") != state.key:
            transport.write(
                json_response(
                    {"error": {"code": "401", "message": "Access denied"}}, b"401 Unauthorized"
                )
            )
            return
        state.requests += 1
        request_id = headers.get(b"x-request-id")
        common = b"Date: %s\r\nApim-Request-Id: %s\r\nX-Ms-Region: emulator\r\n" % (
            state.date(),
            state.apim_id(),
        )
        if request_id:
            common += b"X-Request-Id: %s\r\n" % request_id
        if STREAM_TRUE.search(body) is None:
            transport.write(
                b"HTTP/1.1 200 OK\r\nServer: TornadoServer/6.6.1\r\nContent-Type: application/json\r\n"
                b"%sContent-Length: %d\r\n\r\n%s" % (common, len(COMPLETION), COMPLETION)
            )
            return
        head = (
            b"HTTP/1.1 200 OK\r\nServer: TornadoServer/6.6.1\r\n"
            b"Content-Type: text/event-stream; charset=utf-8\r\n%s"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n" % common
        )
        transport.write(head)
        usage = INCLUDE_USAGE.search(body) is not None
        if not state.slow:
            # One write per event, as the emulator flushes each one.
            for framed in FRAMED_EVENTS[usage]:
                transport.write(framed)
            transport.write(LAST_CHUNK)
            return
        times = state.record_sent((request_id or b"").decode("latin1"))
        self.task = asyncio.get_running_loop().create_task(
            self.slow_stream(state.events[usage], times)
        )
        self.task.add_done_callback(self._stream_done)

    async def slow_stream(self, events: list[bytes], times: list[list[int]]) -> None:
        state = self.state
        state.streams_open += 1
        try:
            for index, event in enumerate(events):
                if index and state.gap:
                    await asyncio.sleep(state.gap)
                if state.hold is not None and index == state.hold:
                    state.streams_held += 1
                    try:
                        await state.release.wait()
                    finally:
                        state.streams_held -= 1
                if self.transport is None:
                    return
                times.append([time.monotonic_ns(), zlib.crc32(event)])
                self.transport.write(frame_chunk(event))
            if self.transport is not None:
                self.transport.write(LAST_CHUNK)
        finally:
            state.streams_open -= 1

    def _stream_done(self, _task: asyncio.Task) -> None:
        self.task = None
        if self.transport is not None:
            self.process()

    def control(self, target: str) -> bytes:
        state = self.state
        path, _, query_string = target.partition("?")
        query = dict(urllib.parse.parse_qsl(query_string))
        if path == "/_bench/stats":
            return json_response(
                {
                    "connections_accepted": state.connections_accepted,
                    "connections_open": state.connections_open,
                    "requests": state.requests,
                    "streams_open": state.streams_open,
                    "streams_held": state.streams_held,
                    "content_events": CONTENT_EVENTS,
                }
            )
        if path == "/_bench/config":
            return json_response(state.configure(query))
        if path == "/_bench/release":
            held = state.streams_held
            state.release.set()
            state.release = asyncio.Event()
            return json_response({"released": held})
        if path == "/_bench/sent":
            return json_response({"sent": state.sent.get(query.get("id", ""), [])})
        return json_response({"error": "unknown control route"}, b"404 Not Found")


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host: str, port: int, key: str) -> None:
    state = State(key.encode())
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: UpstreamProtocol(state), host, port, backlog=4096)
    bound = server.sockets[0].getsockname()[1]
    print(f"fast_upstream listening on http://{host}:{bound}", flush=True)
    stop = asyncio.Event()
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default=os.environ.get("BENCH_KEY", DEFAULT_KEY))
    args = parser.parse_args()
    raise_fd_limit()
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        asyncio.run(serve(args.host, args.port, args.key))
    else:
        uvloop.run(serve(args.host, args.port, args.key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
