"""Fixtures: a real Azure emulator and a real gateway on 127.0.0.1 ephemeral ports."""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from emulator import AzureEmulator
from gateway.config import Settings, load_settings
from handlers.app import make_app
from handlers.listeners import GatewayServer

ROOT = Path(__file__).resolve().parent.parent
EMULATOR_KEY = "emulator-secret-key-3f9a7c"
DEPLOYMENT = "gpt-4o"
API_VERSION = "2024-10-21"


@pytest.fixture
def emulator(io_loop: Any) -> Any:
    emu = AzureEmulator(key=EMULATOR_KEY, deployments=(DEPLOYMENT, "other-deployment"))
    io_loop.run_sync(lambda: emu.start("127.0.0.1", 0))
    yield emu
    io_loop.run_sync(emu.stop)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1, and its key: (cert path, key path)."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(cert), str(key)


@pytest.fixture
def empty_env_file(tmp_path: Path) -> str:
    """An env file with nothing in it, so a developer's own .env never leaks into a test."""
    path = tmp_path / "empty.env"
    path.write_text("")
    return str(path)


@pytest.fixture
def settings_for(emulator: AzureEmulator, empty_env_file: str) -> Callable[..., Settings]:
    def build(**env: str) -> Settings:
        base = {
            "ENV_FILE": empty_env_file,
            "HOST": "127.0.0.1",
            "HTTP_PORT": "0",
            "ENDPOINT": emulator.url,
            "DEPLOYMENT_NAME": DEPLOYMENT,
            "API_VERSION": API_VERSION,
            "KEY": EMULATOR_KEY,
        }
        base.update(env)
        return load_settings(base)

    return build


@dataclass
class RunningGateway:
    server: GatewayServer
    emulator: AzureEmulator
    client: AsyncHTTPClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.ports['http']}"

    async def post(self, path: str, body: Any, **kwargs: Any) -> HTTPResponse:
        headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return await self.client.fetch(
            self.url + path,
            method="POST",
            body=data,
            headers=headers,
            raise_error=False,
            **kwargs,
        )

    async def get(self, path: str, **kwargs: Any) -> HTTPResponse:
        return await self.client.fetch(self.url + path, raise_error=False, **kwargs)


@pytest.fixture
def start_gateway(io_loop: Any, emulator: AzureEmulator, settings_for: Callable[..., Settings]):
    """Start a gateway with extra settings; every one started is shut down after the test."""
    started: list[GatewayServer] = []
    client = AsyncHTTPClient(force_instance=True)

    def start(clock: Callable[[], float] | None = None, **env: str) -> RunningGateway:
        settings = settings_for(**env)
        app = make_app(settings) if clock is None else make_app(settings, clock=clock)
        server = GatewayServer(app, settings)
        server.start()
        started.append(server)
        return RunningGateway(server, emulator, client)

    yield start
    client.close()
    for server in started:
        io_loop.run_sync(server.shutdown)


@pytest.fixture
def gateway(start_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    """One attempt per request, so each upstream failure shows as it maps (failover has its own tests)."""
    return start_gateway(MAX_ATTEMPTS="1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PYTHON = sys.executable


# --- a real redis-server ------------------------------------------------------

REDIS_READY_TIMEOUT = 10.0


def answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    # Without AUTH a password-protected server answers NOAUTH: it is up all the same.
    return reply.startswith((b"+PONG", b"-NOAUTH"))


class RedisServer:
    """A redis-server subprocess on 127.0.0.1, with nothing saved to disk."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.workdir = workdir
        self.password = password
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian package: redis-server)")
        command = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
        ]  # fmt: skip
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + REDIS_READY_TIMEOUT
        while not answers_ping(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not answer PING on port {self.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)


@pytest.fixture
def start_redis(tmp_path: Path):
    """Start a redis-server (optionally with a password); every one is killed after the test."""
    servers: list[RedisServer] = []

    def start(password: str | None = None) -> RedisServer:
        server = RedisServer(tmp_path, password)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def redis_server(start_redis: Callable[..., RedisServer]) -> RedisServer:
    return start_redis()


@pytest.fixture
def redis_client(io_loop: Any, redis_server: RedisServer):
    """Clients of one redis-server, made with redis-py's options and closed after the test."""
    clients: list[aioredis.Redis] = []

    def connect(**options: Any) -> aioredis.Redis:
        clients.append(aioredis.Redis.from_url(redis_server.url, **options))
        return clients[-1]

    yield connect
    for client in clients:
        io_loop.run_sync(client.aclose)


# --- server.py as a child process -------------------------------------------

STARTUP_TIMEOUT = 20.0


def server_env(tmp_path, **extra: str) -> dict[str, str]:
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    return {"PATH": os.environ["PATH"], "ENV_FILE": str(env_file), "HOST": "127.0.0.1", **extra}


class ServerProcess:
    """server.py in a child process, with its output read as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "server.py", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = ""
        self._seen = 0

    def wait_for(self, pattern: str, timeout: float = STARTUP_TIMEOUT) -> re.Match:
        """The first match of `pattern` in output not yet matched, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                match = re.compile(pattern).search(self.output, self._seen)
                if match:
                    self._seen = match.end()
                    return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not selector.select(remaining):
                    break
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.output += chunk.decode()
        raise AssertionError(f"no output matching {pattern!r} in:\n{self.output}")

    def finish(self, timeout: float = STARTUP_TIMEOUT) -> str:
        remaining, _ = self.proc.communicate(timeout=timeout)
        self.output += remaining.decode()
        return self.output


@pytest.fixture
def spawn():
    started: list[ServerProcess] = []

    def start(env: dict[str, str], *args: str) -> ServerProcess:
        started.append(ServerProcess(env, *args))
        return started[-1]

    yield start
    for server in started:
        if server.proc.poll() is None:
            server.proc.kill()
        server.proc.wait(10)
        server.proc.stdout.close()
