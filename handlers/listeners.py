"""GatewayServer: the HTTP (and HTTPS) listeners of one app, and their drain on shutdown.

Every use of Tornado's private attributes in the project is in this module,
read from Tornado 6.6.1, so an upgrade has one file to check:
`HTTPServer._sockets`, `_handle_connection`, `_connections` and `conn_params`
(the drain), `GZipContentEncoding._compressible_type` (which answers are
gzipped), `HTTPServerRequest._start_time` (the access log's time),
`RequestHandler._headers` (constant headers written without re-checking),
`HTTPServerRequest._body_future` (when the whole body is in)
and the `HTTP1Connection.stream` of a request (TCP_NODELAY for streams).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable

from tornado.httpserver import HTTPServer
from tornado.httputil import HTTPServerRequest
from tornado.netutil import bind_sockets
from tornado.web import Application, GZipContentEncoding, RequestHandler

from gateway.config import Settings
from gateway.pipeline import Pipeline

log = logging.getLogger("azure-gpt-api")

# Bodies over MAX_BODY_SIZE are read and dropped so the caller gets a 413;
# past this much, Tornado cuts the connection instead of reading on.
DISCARD_BODY_LIMIT = 64 * 1024 * 1024
# Tornado reads a header block up to this many times MAX_HEADER_SIZE, so one
# over the limit is still answered with a 431 (handlers/base.py); past that it
# closes the connection without an answer, as it must stop reading somewhere.
HEADER_READ_FACTOR = 4
# Seconds without a request before the drain cuts idle keep-alive connections.
DRAIN_QUIET = 1.0


class JsonOnlyGzip(GZipContentEncoding):
    """gzip JSON answers only: a compressed event stream would be held back by the compressor."""

    def _compressible_type(self, ctype: str) -> bool:
        return ctype == "application/json"


def request_start_time(request: HTTPServerRequest) -> float:
    """When Tornado began reading the request (wall clock)."""
    return request._start_time  # type: ignore[attr-defined]


def when_body_received(request: HTTPServerRequest, callback: Callable[[], None]) -> None:
    """Call `callback` once the whole body is in: Tornado resolves this private future
    then (RequestHandler._execute awaits it); it is the only signal of that."""
    request._body_future.add_done_callback(lambda _: callback())  # type: ignore[attr-defined]


def set_nodelay(request: HTTPServerRequest) -> None:
    """Send small writes at once: with events 10 ms apart, Nagle and the caller's
    delayed ACK held some back by ~40 ms."""
    request.connection.stream.set_nodelay(True)  # type: ignore[union-attr]


def set_constant_headers(handler: RequestHandler, headers: Iterable[tuple[str, str]]) -> None:
    """Headers fixed in the code: set_header's per-value check is for values from outside."""
    target = handler._headers  # type: ignore[attr-defined]
    for name, value in headers:
        target[name] = value


class GatewayServer:
    """The HTTP (and optional HTTPS) listeners of one app, and their orderly shutdown."""

    def __init__(self, app: Application, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.pipeline: Pipeline = app.settings["pipeline"]
        self.servers: list[HTTPServer] = []
        self.ports: dict[str, int] = {}

    def _listen(self, scheme: str, port: int, ssl_options: ssl.SSLContext | None) -> None:
        server = HTTPServer(
            self.app,
            ssl_options=ssl_options,
            max_body_size=max(DISCARD_BODY_LIMIT, self.settings.max_body_size),
            max_header_size=HEADER_READ_FACTOR * self.settings.max_header_size,
            # Also how long Tornado waits for a request's headers; it closes
            # the connection then, as no request has begun to be answered.
            idle_connection_timeout=self.settings.keep_alive_timeout,
        )
        # SO_REUSEPORT lets several PM2 instances share one port.
        sockets = bind_sockets(port, self.settings.host, reuse_port=True)
        server.add_sockets(sockets)
        self.servers.append(server)
        self.ports[scheme] = sockets[0].getsockname()[1]

    def start(self) -> None:
        self.pipeline.start()
        self._listen("http", self.settings.http_port, None)
        if self.settings.enable_ssl:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.settings.ssl_cert, self.settings.ssl_key)  # type: ignore[arg-type]
            self._listen("https", self.settings.https_port, context)

    def _open_connections(self) -> int:
        return sum(len(server._connections) for server in self.servers)  # type: ignore[attr-defined]

    def _stop_accepting(self) -> None:
        """Close the listeners, after accepting what the kernel already accepted for them.

        Connections completed in a listener's backlog would be reset by the
        close although their callers were told they are connected; Tornado's
        own accept loop is run once more for them. Keep-alive is switched off,
        so each open connection serves at most one more request.
        """
        for server in self.servers:
            for sock in server._sockets.values():  # type: ignore[attr-defined]
                while True:
                    try:
                        connection, address = sock.accept()
                    except BlockingIOError:
                        break
                    except ConnectionAbortedError:
                        continue
                    server._handle_connection(connection, address)  # type: ignore[attr-defined]
            server.stop()
            server.conn_params.no_keep_alive = True  # type: ignore[attr-defined]

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (up to DRAIN_TIMEOUT), then close.

        With DRAIN_GRACE, /readyz answers 503 for that long first, while the
        listener still accepts, so a load balancer stops sending before it closes.

        Made for rolling restarts (`pm2 reload`), where other instances keep
        serving the port and no caller may see an error: the backlog is
        accepted before the listener closes; keep-alive is switched off, so
        each open connection's caller reconnects (to another instance) after
        its answer (`Connection: close`) rather than finding it cut; a
        connection is closed only once its requests are done and no request
        has come in for DRAIN_QUIET seconds (an idle keep-alive connection may
        have a request on its way). DRAIN_TIMEOUT bounds it all.
        """
        in_flight = self.pipeline.in_flight
        in_flight.draining = True  # /readyz answers 503 from now on
        if self.settings.drain_grace:
            log.info(
                "draining: /readyz is 503; closing the listener in %g s", self.settings.drain_grace
            )
            await asyncio.sleep(self.settings.drain_grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        self._stop_accepting()
        log.info("draining %d in-flight request(s)", in_flight.count)

        quiet_since, seen = loop.time(), self._open_connections()
        while (seen or in_flight.count) and loop.time() < deadline:
            if in_flight.count:
                if not await in_flight.wait_idle(deadline - loop.time()):
                    break
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= DRAIN_QUIET:
                break  # only idle keep-alive connections are left
            else:
                await asyncio.sleep(0.05)
            if self._open_connections() != seen:  # a connection ended: it had just been answered
                quiet_since, seen = loop.time(), self._open_connections()
        if in_flight.count:
            log.warning("drain timeout: closing %d request(s) still in flight", in_flight.count)
        for server in self.servers:
            await server.close_all_connections()
        await self.pipeline.close()
        if self.pipeline.tracer.enabled:
            # The last spans, sent off the event loop (bounded by the tracer's own timeout).
            await asyncio.to_thread(self.pipeline.tracer.shutdown)
