"""azure-gpt-api: start-up, listeners, signals and the drain on shutdown.

    python server.py              # settings from the environment and .env
    python server.py --emulator   # answer from the built-in Azure emulator
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import ssl
import sys
from types import MappingProxyType
from typing import Mapping

import uvloop
from prometheus_client import CollectorRegistry
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, GZipContentEncoding

from gateway.accesslog import ACCESS_LOG, default_format
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.context import GatewayContext
from emulator import AzureEmulator
from gateway.keys import KeyRing
from gateway.metrics import MULTIPROC_DIR_VARIABLE, Metrics, forget_dead_processes
from gateway.quota import MemoryQuota, RedisQuota
from gateway.routing import DeploymentPool, Failover
from gateway.upstream import UpstreamClient
from gateway.validation import BodyValidator, load_registry
from handlers.base import NotFoundHandler
from handlers.chat import GptChatHandler
from handlers.openai import AzureChatHandler, ModelsHandler, OpenAIChatHandler
from handlers.ops import HealthHandler, MetricsHandler, ReadyHandler, UsageHandler
from handlers.status import StatusHandler

log = logging.getLogger("azure-gpt-api")

# Bodies over MAX_BODY_SIZE are read and dropped so the caller gets a 413;
# past this much, Tornado cuts the connection instead of reading on.
DISCARD_BODY_LIMIT = 64 * 1024 * 1024
# Tornado reads a header block up to this many times MAX_HEADER_SIZE, so one
# over the limit is still answered with a 431 (handlers/base.py); past that it
# closes the connection without an answer, as it must stop reading somewhere.
HEADER_READ_FACTOR = 4
EMULATOR_DEPLOYMENT = "gpt-4o"
EMULATOR_API_VERSION = "2024-10-21"


class JsonOnlyGzip(GZipContentEncoding):
    """gzip JSON answers only: a compressed event stream would be held back by the compressor."""

    def _compressible_type(self, ctype: str) -> bool:
        return ctype == "application/json"


def make_app(settings: Settings) -> Application:
    """Build the application and everything its handlers share."""
    registry = load_registry()
    pool = DeploymentPool(settings.deployments, max_cooldown=settings.max_cooldown)
    metrics = Metrics(CollectorRegistry())
    quota = (
        RedisQuota(
            settings.redis_url.reveal(),
            settings.quota_on_redis_error,
            on_redis_error=metrics.redis_errors_total.inc,
        )
        if settings.redis_url
        else MemoryQuota()
    )
    context = GatewayContext(
        settings=settings,
        upstream=UpstreamClient(settings),
        pool=pool,
        failover=Failover(
            pool, max_attempts=settings.max_attempts, max_retry_wait=settings.max_retry_wait
        ),
        validators={
            name: BodyValidator(f"{name}.schema.json", registry)
            for name in ("gpt_chat", "chat_completions")
        },
        keyring=KeyRing(settings.caller_keys),
        quota=quota,
        metrics=metrics,
    )
    return Application(
        [
            (r"/v1/?", StatusHandler),
            (r"/v1/gpt/chat/?", GptChatHandler),
            (r"/v1/chat/completions", OpenAIChatHandler),
            (r"/v1/models", ModelsHandler),
            (r"/openai/deployments/([^/]+)/chat/completions", AzureChatHandler),
            (r"/v1/usage", UsageHandler),
            (r"/metrics", MetricsHandler),
            (r"/healthz", HealthHandler),
            (r"/readyz", ReadyHandler),
        ],
        default_handler_class=NotFoundHandler,
        transforms=[JsonOnlyGzip],
        context=context,
        log_function=lambda handler: context.request_finished(handler.access_record()),
    )


class GatewayServer:
    """The HTTP (and optional HTTPS) listeners of one app, and their orderly shutdown."""

    def __init__(self, app: Application, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.context: GatewayContext = app.settings["context"]
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
        self._listen("http", self.settings.http_port, None)
        if self.settings.enable_ssl:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.settings.ssl_cert, self.settings.ssl_key)
            self._listen("https", self.settings.https_port, context)

    async def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish (up to DRAIN_TIMEOUT), then close.

        With DRAIN_GRACE, /readyz answers 503 for that long first, while the
        listener still accepts, so a load balancer stops sending before it closes.

        Made for rolling restarts (`pm2 reload`), where other instances keep
        serving the port and no caller may see an error:

        - Connections the kernel has already completed in the listener's
          backlog are accepted before the listener closes, which would reset
          them although their callers were told they are connected.
        - Keep-alive is switched off: each open connection serves at most one
          more request, answered with `Connection: close`, so its caller
          reconnects (to another instance) rather than finding it cut.
        - A connection is closed only once its requests are done and no
          request has come in for `quiet` seconds: an idle keep-alive
          connection may have a request on its way. DRAIN_TIMEOUT bounds it all.
        """
        in_flight = self.context.in_flight
        in_flight.draining = True  # /readyz answers 503 from now on
        if self.settings.drain_grace:
            log.info("draining: /readyz is 503; closing the listener in %g s", self.settings.drain_grace)
            await asyncio.sleep(self.settings.drain_grace)
        quiet = 1.0  # seconds without a request before idle connections are cut
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        for server in self.servers:
            # Tornado's own accept loop, run once more just before the close.
            for sock in server._sockets.values():
                while True:
                    try:
                        connection, address = sock.accept()
                    except BlockingIOError:
                        break
                    except ConnectionAbortedError:
                        continue
                    server._handle_connection(connection, address)
            server.stop()
            server.conn_params.no_keep_alive = True
        log.info("draining %d in-flight request(s)", in_flight.count)

        def open_connections() -> int:
            return sum(len(server._connections) for server in self.servers)

        quiet_since, seen = loop.time(), open_connections()
        while (seen or in_flight.count) and loop.time() < deadline:
            if in_flight.count:
                if not await in_flight.wait_idle(deadline - loop.time()):
                    break
                quiet_since = loop.time()
            elif loop.time() - quiet_since >= quiet:
                break  # only idle keep-alive connections are left
            else:
                await asyncio.sleep(0.05)
            if open_connections() != seen:  # a connection ended: it had just been answered
                quiet_since, seen = loop.time(), open_connections()
        if in_flight.count:
            log.warning("drain timeout: closing %d request(s) still in flight", in_flight.count)
        for server in self.servers:
            await server.close_all_connections()
        self.context.upstream.close()
        await self.context.quota.close()


def tell_pm2_ready() -> None:
    """Send PM2 the `ready` message that `wait_ready` waits for, over Node's IPC channel."""
    channel = os.environ.get("NODE_CHANNEL_FD")
    if channel and channel.isdigit():
        try:
            os.write(int(channel), b'"ready"\n')
        except OSError as error:
            log.warning("could not tell PM2 we are ready: %s", error)


async def start_emulator_settings(environ: Mapping[str, str]) -> tuple[AzureEmulator, Settings]:
    key = secrets.token_urlsafe(24)
    emulator = AzureEmulator(key=key, deployments=(EMULATOR_DEPLOYMENT,))
    await emulator.start("127.0.0.1", 0)
    settings = load_settings(
        environ,
        defaults={"LOG_FORMAT": default_format()},
        overrides={
            "ENDPOINT": emulator.url,
            "DEPLOYMENT_NAME": EMULATOR_DEPLOYMENT,
            "API_VERSION": EMULATOR_API_VERSION,
            "KEY": key,
        },
    )
    # The built-in emulator is on this machine: never reached through a proxy.
    return emulator, dataclasses.replace(settings, proxies=MappingProxyType({}))


async def serve(args: argparse.Namespace) -> int:
    emulator = None
    try:
        if args.emulator:
            emulator, settings = await start_emulator_settings(os.environ)
        else:
            settings = load_settings(os.environ, defaults={"LOG_FORMAT": default_format()})
    except ConfigError as error:
        for problem in error.problems:
            print(f"config error: {problem}", file=sys.stderr)
        print("Set these in the environment or in .env (see sample.env).", file=sys.stderr)
        return 2

    metrics_dir = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if metrics_dir:
        # Several instances share their metrics here; a crashed one's gauges must stop counting.
        os.makedirs(metrics_dir, exist_ok=True)
        forget_dead_processes(metrics_dir)
    if not settings.caller_keys:
        log.warning(
            "no caller keys configured (API_KEYS, or keys: in DEPLOYMENTS_FILE): "
            "the gateway is open to anyone who can reach it"
        )
    server = GatewayServer(make_app(settings), settings)
    try:
        server.start()
    except OSError as error:
        print(f"cannot listen: {error}", file=sys.stderr)
        return 1
    if emulator is not None:
        print(
            "*** EMULATOR MODE: answers are synthetic, made by the built-in Azure OpenAI "
            f"emulator at {emulator.url}; no Azure account is used. ***",
            flush=True,
        )
    for scheme, port in server.ports.items():
        print(f"azure-gpt-api listening on {scheme}://{settings.host}:{port}", flush=True)
    tell_pm2_ready()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.shutdown()
    if emulator is not None:
        await emulator.stop()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="serve answers from the built-in Azure OpenAI emulator (no Azure account needed)",
    )
    args = parser.parse_args()
    configure_logging()
    # uvloop: about 8 % less CPU per request than asyncio's own loop (bench/README.md).
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(args))


def configure_logging() -> None:
    """Access lines go to stdout as they are (JSON must stay one clean line); the rest to stderr."""
    # No format here shows a record's thread or process: don't look them up
    # for each record (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    access = logging.StreamHandler(sys.stdout)
    access.setFormatter(logging.Formatter("%(message)s"))
    ACCESS_LOG.addHandler(access)
    ACCESS_LOG.propagate = False


if __name__ == "__main__":
    sys.exit(main())
