"""The benchmark's own HTTP/1.1 client: keep-alive connections on bare asyncio protocols.

wrk drives the throughput and latency runs; this client does what wrk cannot
(timestamp each streamed event, hold 2,000 streams open, count requests
exactly) and stands in for wrk when wrk is not installed. It speaks only as
much HTTP/1.1 as the gateway and the stand-in answer with: Content-Length or
chunked bodies, keep-alive.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field


class ConnectionClosed(Exception):
    pass


def build_request(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method == "POST":
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class ClientProtocol(asyncio.Protocol):
    """One keep-alive connection, one request at a time; the body can be watched as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[Response] | None = None
        self.on_body: Callable[[bytes, int], None] | None = None
        self.keep_body = True
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.state = "head"
        self.status = 0
        self.headers: dict[str, str] = {}
        self.remaining = 0
        self.chunked = False
        self.body = bytearray()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionClosed(str(exc or "connection closed by peer")))

    def data_received(self, data: bytes) -> None:
        now = time.monotonic_ns()
        self.buffer += data
        try:
            self._parse(now)
        except Exception as error:  # a malformed answer fails the request, not the loop
            if self.waiter is not None and not self.waiter.done():
                self.waiter.set_exception(error)
            if self.transport is not None:
                self.transport.close()

    # parsing

    def _deliver(self, data: bytes, now: int) -> None:
        if self.keep_body:
            self.body += data
        if self.on_body is not None:
            self.on_body(data, now)

    def _parse(self, now: int) -> None:
        buf = self.buffer
        while True:
            if self.state == "head":
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                lines = bytes(buf[:end]).decode("latin1").split("\r\n")
                del buf[: end + 4]
                self.status = int(lines[0].split(" ", 2)[1])
                if self.status == 100:
                    continue
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    self.headers[name.strip().lower()] = value.strip()
                if "chunked" in self.headers.get("transfer-encoding", "").lower():
                    self.chunked = True
                    self.state = "size"
                else:
                    self.remaining = int(self.headers.get("content-length", "0"))
                    self.state = "data"
            elif self.state == "size":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                if size == 0:
                    self.state = "trailer"
                else:
                    self.remaining = size
                    self.state = "data"
            elif self.state == "data":
                if self.remaining:
                    if not buf:
                        return
                    take = min(len(buf), self.remaining)
                    self._deliver(bytes(buf[:take]), now)
                    del buf[:take]
                    self.remaining -= take
                    if self.remaining:
                        return
                if self.chunked:
                    self.state = "crlf"
                else:
                    self._complete()
                    return
            elif self.state == "crlf":
                if len(buf) < 2:
                    return
                del buf[:2]
                self.state = "size"
            elif self.state == "trailer":
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                del buf[: end + 2]
                if end == 0:
                    self._complete()
                    return

    def _complete(self) -> None:
        response = Response(self.status, self.headers, bytes(self.body))
        self._reset()
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    # use

    async def request(
        self,
        raw: bytes,
        on_body: Callable[[bytes, int], None] | None = None,
        keep_body: bool = True,
    ) -> Response:
        if self.closed or self.transport is None:
            raise ConnectionClosed("connection already closed")
        self.waiter = asyncio.get_running_loop().create_future()
        self.on_body = on_body
        self.keep_body = keep_body
        self.transport.write(raw)
        return await self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int) -> ClientProtocol:
    loop = asyncio.get_running_loop()
    _, protocol = await loop.create_connection(ClientProtocol, host, port)
    return protocol


async def fetch(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Response:
    """One request on a fresh connection."""
    conn = await asyncio.wait_for(connect(host, port), timeout)
    try:
        return await asyncio.wait_for(
            conn.request(build_request(method, path, body, headers)), timeout
        )
    finally:
        conn.close()


async def get_json(host: str, port: int, path: str, timeout: float = 10.0) -> dict:
    response = await fetch(host, port, "GET", path, timeout=timeout)
    return json.loads(response.body)


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return math.nan
    rank = max(0, min(len(sorted_values) - 1, math.ceil(pct / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


def raise_fd_limit(wanted: int) -> int:
    """Raise this process's open-file limit towards `wanted`; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(max(wanted, soft), hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# ---------------------------------------------------------------- load loop (wrk's stand-in)


async def load(
    host: str,
    port: int,
    raw: bytes,
    *,
    connections: int,
    duration: float,
    max_requests: int | None = None,
    expect_status: int = 200,
) -> dict:
    """Keep `connections` connections busy for `duration` seconds (or `max_requests` in all).

    Returns what the wrk runner returns: requests, duration, latency
    percentiles (ms), and errors by kind.
    """
    latencies: list[float] = []
    errors = {"connect": 0, "read": 0, "status": 0, "timeout": 0}
    started = time.perf_counter()
    deadline = started + duration
    budget = [max_requests if max_requests is not None else math.inf]

    async def worker() -> None:
        try:
            conn = await asyncio.wait_for(connect(host, port), 10)
        except (TimeoutError, OSError):
            errors["connect"] += 1
            return
        try:
            while time.perf_counter() < deadline and budget[0] > 0:
                budget[0] -= 1
                t0 = time.perf_counter()
                try:
                    response = await asyncio.wait_for(
                        conn.request(raw, keep_body=False), max(1.0, deadline - t0 + 5)
                    )
                except TimeoutError:
                    errors["timeout"] += 1
                    return
                except (ConnectionClosed, OSError):
                    errors["read"] += 1
                    return
                latencies.append(time.perf_counter() - t0)
                if response.status != expect_status:
                    errors["status"] += 1
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "duration_s": elapsed,
        "rps": len(latencies) / elapsed if elapsed else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p90": percentile(latencies, 90) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": (latencies[-1] * 1000) if latencies else math.nan,
        },
        "errors": errors,
        "generator": "python",
    }


# ---------------------------------------------------------------- streams


@dataclass
class StreamWatch:
    """Splits a streamed body into events and notes when each one was complete."""

    arrivals_ns: list[int] = field(default_factory=list)
    crcs: list[int] = field(default_factory=list)
    pending: bytes = b""
    done: bool = False
    first: asyncio.Future | None = None

    def feed(self, data: bytes, now: int) -> None:
        self.pending += data
        while True:
            end = self.pending.find(b"\n\n")
            if end < 0:
                return
            event, self.pending = self.pending[: end + 2], self.pending[end + 2 :]
            self.arrivals_ns.append(now)
            self.crcs.append(zlib.crc32(event))
            if event.startswith(b"data: [DONE]"):
                self.done = True
            if self.first is not None and not self.first.done():
                self.first.set_result(now)


def match_events(sent: list[list[int]], watch: StreamWatch) -> list[float] | None:
    """Each received event's latency (ms) after the sending of the same bytes upstream.

    Events are matched by checksum, in order, so an event the gateway leaves
    out (the usage event it asked for itself) is skipped rather than
    misattributed. None if a received event was never sent.
    """
    lags = []
    position = 0
    for arrived, crc in zip(watch.arrivals_ns, watch.crcs):
        while position < len(sent) and sent[position][1] != crc:
            position += 1
        if position == len(sent):
            return None
        lags.append((arrived - sent[position][0]) / 1e6)
        position += 1
    return lags or None


async def timed_streams(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    streams: int,
    tag: str,
    sent_times: Callable[[str], asyncio.Future[list[list[int]]]],
    timeout: float,
    stagger: float = 0.0,
) -> dict:
    """Run `streams` streams together, started `stagger` s apart; match each event's arrival with when the upstream sent it.

    `sent_times(request_id)` asks the stand-in when it sent each event of
    that stream (and the event's crc32). Latencies are in ms, per event:
    arrival here minus sending there, on the system-wide monotonic clock.
    """

    async def one(index: int) -> tuple[str, StreamWatch, int]:
        # Staggered starts, so that no two streams' events reach the server at the same moment.
        await asyncio.sleep(index * stagger)
        request_id = f"{tag}-{index}-{time.monotonic_ns()}"
        watch = StreamWatch()
        conn = await connect(host, port)
        try:
            raw = build_request("POST", path, body, {**headers, "x-request-id": request_id})
            response = await asyncio.wait_for(
                conn.request(raw, watch.feed, keep_body=False), timeout
            )
        finally:
            conn.close()
        return request_id, watch, response.status

    results = await asyncio.gather(
        *(one(index) for index in range(streams)), return_exceptions=True
    )
    first: list[float] = []
    every: list[float] = []
    errors: list[str] = []
    for result in results:
        if isinstance(result, BaseException):
            errors.append(f"{type(result).__name__}: {result}")
            continue
        request_id, watch, status = result
        if status != 200 or not watch.done:
            errors.append(f"stream {request_id}: status {status}, done={watch.done}")
            continue
        sent = await sent_times(request_id)
        lags = match_events(sent, watch)
        if lags is None:
            errors.append(
                f"stream {request_id}: the {len(watch.crcs)} events received are not "
                f"among the {len(sent)} sent, in order"
            )
            continue
        first.append(lags[0])
        every.extend(lags)
    first.sort()
    every.sort()
    return {
        "streams": streams,
        "events_timed": len(every),
        "first_event_ms": {"p50": percentile(first, 50), "max": first[-1] if first else math.nan},
        "any_event_ms": {
            "p50": percentile(every, 50),
            "p99": percentile(every, 99),
            "max": every[-1] if every else math.nan,
        },
        "errors": errors,
    }


async def held_streams(
    host: str,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    *,
    streams: int,
    connect_parallel: int,
    open_timeout: float,
    on_all_open: Callable[[int], asyncio.Future[dict]],
    finish_timeout: float,
) -> dict:
    """Open `streams` streams that the stand-in holds after their first events.

    Once every stream has had its first event (or `open_timeout` passed),
    `on_all_open(opened)` runs (it measures the server and releases the
    stand-in); then every stream must end with its [DONE] event.
    """
    raise_fd_limit(streams + 1024)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(connect_parallel)
    watches = [StreamWatch(first=loop.create_future()) for _ in range(streams)]
    raw = build_request("POST", path, body, headers)

    async def one(watch: StreamWatch) -> Response:
        async with gate:
            conn = await asyncio.wait_for(connect(host, port), 30)
            pending = asyncio.ensure_future(conn.request(raw, watch.feed, keep_body=False))
            # Free the slot once this stream is open, so opening stays paced.
            await asyncio.wait([pending, watch.first], return_when=asyncio.FIRST_COMPLETED)
        try:
            return await pending
        finally:
            conn.close()

    tasks = [asyncio.ensure_future(one(watch)) for watch in watches]
    started = time.monotonic()
    await asyncio.wait([watch.first for watch in watches], timeout=open_timeout)
    opened = sum(1 for watch in watches if watch.first.done())
    open_seconds = time.monotonic() - started
    measured = await on_all_open(opened)
    done, not_done = await asyncio.wait(tasks, timeout=finish_timeout)
    for task in not_done:
        task.cancel()
    completed = 0
    errors: list[str] = []
    for task, watch in zip(tasks, watches):
        if task in not_done:
            continue
        if task.exception() is not None:
            errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
        elif task.result().status == 200 and watch.done:
            completed += 1
    for watch in watches:
        if not watch.first.done():
            watch.first.cancel()
    return {
        "streams": streams,
        "opened": opened,
        "open_seconds": open_seconds,
        "completed": completed,
        "dropped": streams - completed,
        "unfinished": len(not_done),
        "errors": sorted(set(errors))[:5],
        **measured,
    }
