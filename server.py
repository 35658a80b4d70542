"""azure-gpt-api: arguments, settings, logging and signals; the app is handlers/app.py.

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
import sys
from collections.abc import Mapping
from types import MappingProxyType

import uvloop

from emulator import AzureEmulator
from gateway.config import Settings, load_settings
from gateway.errors import ConfigError
from gateway.ops.accesslog import ACCESS_LOG, default_format
from gateway.ops.metrics import MULTIPROC_DIR_VARIABLE, forget_dead_processes
from handlers.app import make_app
from handlers.listeners import GatewayServer

log = logging.getLogger("azure-gpt-api")

EMULATOR_DEPLOYMENT = "gpt-4o"
EMULATOR_API_VERSION = "v1"


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
