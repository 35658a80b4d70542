"""PM2 runs the gateway from ecosystem.config.js, and `pm2 reload` under load drops nothing.

Uses the project's own PM2 (`npm ci` puts it in node_modules/.bin) with
PM2_HOME in a temporary directory, so no daemon or file of the user's ~/.pm2
is touched, and the daemon is killed at the end. Both instances share one
standalone emulator, so a reload never takes the upstream down with it.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import selectors
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .conftest import API_VERSION, DEPLOYMENT, PYTHON, ROOT, free_port
from .support.metrics import samples, series

PM2 = ROOT / "node_modules" / ".bin" / "pm2"
APP = "azure-gpt-api"
INSTANCES = 2

# A 10-word answer is 13 stream events: with this gap a stream lasts about 1.5 s.
CHUNK_GAP = 0.12
STREAM_PROMPT = "one two three four five six seven eight"
STREAM_WORKERS = 6
SHORT_WORKERS = 2  # one on a keep-alive connection, one on a new connection per request
MAX_STREAMS_PER_WORKER = 40
MAX_SHORTS_PER_WORKER = 10000
REQUEST_TIMEOUT = 15.0
PM2_TIMEOUT = 45.0
LOAD_DEADLINE = 50.0  # seconds from the start of the load: no worker goes on past it

# The emulator both instances use, on a port of its own; prints its URL, stops on SIGTERM.
EMULATOR = """
import asyncio, signal, sys
from emulator import AzureEmulator

async def main(key, deployment):
    emulator = AzureEmulator(key=key, deployments=(deployment,))
    await emulator.start("127.0.0.1", 0)
    print(emulator.url, flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    await stop.wait()
    await emulator.stop()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` prints, within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    output = b""
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while b"\n" not in output:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            output += chunk
    if b"\n" not in output:
        raise AssertionError(f"no line from the emulator within {timeout} s: {output!r}")
    return output.split(b"\n", 1)[0].decode()


@pytest.fixture
def shared_emulator() -> Iterator[tuple[str, str]]:
    """A standalone emulator process: (url, key)."""
    key = secrets.token_urlsafe(16)
    proc = subprocess.Popen(
        [PYTHON, "-c", EMULATOR, key, DEPLOYMENT],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield read_line(proc, 20.0), key
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()


@dataclass
class Pm2:
    """The pm2 command line, with a daemon of its own in a temporary PM2_HOME."""

    home: Path
    env: dict[str, str]

    def run(self, *args: str, timeout: float = PM2_TIMEOUT) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(PM2), *args],
            cwd=ROOT,
            env=self.env,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, (
            f"pm2 {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        )
        return result

    def processes(self) -> list[dict]:
        return [p for p in json.loads(self.run("jlist").stdout) if p["name"] == APP]

    def wait_online(self, count: int, timeout: float = 20.0) -> dict[int, int]:
        """{pm_id: pid} once `count` instances are online, polling `pm2 jlist` until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            processes = self.processes()
            online = {
                p["pm_id"]: p["pid"]
                for p in processes
                if p["pm2_env"]["status"] == "online" and p["pid"]
            }
            if len(online) == count:
                return online
            if time.monotonic() > deadline:
                states = [(p["pm_id"], p["pid"], p["pm2_env"]["status"]) for p in processes]
                raise AssertionError(
                    f"not {count} instances online within {timeout} s: {states}\n{self.logs()}"
                )
            time.sleep(0.2)

    def logs(self) -> str:
        """The daemon's log and the app's, for a failure message."""
        parts = []
        for path in [self.home / "pm2.log", *sorted((self.home / "logs").glob("*.log"))]:
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                # PM2 logs one line per 100 ms while it waits for a process to exit.
                text = "\n".join(line for line in lines if "retrying in" not in line)
                parts.append(f"--- {path.name} (last 6000 characters) ---\n{text[-6000:]}")
        return "\n".join(parts)


@pytest.fixture
def pm2(tmp_path: Path, shared_emulator: tuple[str, str]) -> Iterator[Pm2]:
    if not PM2.exists():
        pytest.fail("PM2 is not installed: `make test` installs it (npm ci)")
    # PM2_HOME holds the daemon's unix sockets: keep its path short.
    home = Path(tempfile.mkdtemp(prefix="pm2-"))
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    url, key = shared_emulator
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "PM2_HOME": str(home),
        # What the apps get (PM2 hands its caller's environment to the apps it starts).
        "ENV_FILE": str(env_file),
        "HOST": "127.0.0.1",
        "HTTP_PORT": str(free_port()),
        "ENDPOINT": url,
        "KEY": key,
        "DEPLOYMENT_NAME": DEPLOYMENT,
        "API_VERSION": API_VERSION,
        "DRAIN_TIMEOUT": "20",
        "PM2_INSTANCES": str(INSTANCES),
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics"),
    }
    runner = Pm2(home, env)
    try:
        yield runner
    finally:
        try:
            subprocess.run(
                [str(PM2), "kill"],
                cwd=ROOT,
                env=env,
                timeout=60,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
        finally:
            # Keep the logs with the test's tmp_path (pytest keeps the last few).
            kept = tmp_path / "pm2-logs"
            kept.mkdir()
            for path in [home / "pm2.log", *(home / "logs").glob("*.log")]:
                if path.exists():
                    shutil.copy(path, kept)
            shutil.rmtree(home, ignore_errors=True)


@dataclass
class Load:
    """Callers hitting the gateway from threads until told to stop; every outcome is kept."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: dict[str, list[float]] = field(default_factory=lambda: {"stream": [], "short": []})
    failures: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.deadline = self.started + LOAD_DEADLINE
        self.warm = threading.Barrier(STREAM_WORKERS + SHORT_WORKERS + 1)

    def go_on(self) -> bool:
        return not self.stop.is_set() and time.monotonic() < self.deadline

    def record(self, kind: str, failure: str | None) -> None:
        with self.lock:
            if failure is None:
                self.done[kind].append(time.monotonic())
            else:
                self.failures.append(f"{time.monotonic() - self.started:7.3f}s {failure}")

    def worker(self, name: str, kind: str, limit: int, keep_alive: bool) -> None:
        stream = kind == "stream"
        body = json.dumps({"prompt": STREAM_PROMPT if stream else "ping", "stream": stream})
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            for number in range(limit):
                if number == 1:
                    # Everyone has had an answer: the reload may start.
                    try:
                        self.warm.wait(REQUEST_TIMEOUT * 2)
                    except threading.BrokenBarrierError:
                        pass
                if number and not self.go_on():
                    break
                self.record(kind, self.one_request(connection, body, stream, f"{name} #{number}"))
                if not keep_alive:
                    connection.close()
        finally:
            connection.close()

    def one_request(
        self, connection: http.client.HTTPConnection, body: str, stream: bool, label: str
    ) -> str | None:
        """None if the request succeeded, else what went wrong."""
        try:
            connection.request(
                "POST", "/v1/gpt/chat", body=body, headers={"Content-Type": "application/json"}
            )
            response = connection.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            connection.close()
            return f"{label}: {error!r}"
        if response.status != 200:
            return f"{label}: status {response.status}: {data[:300]!r}"
        if stream:
            if not data.rstrip().endswith(b"data: [DONE]"):
                return f"{label}: stream did not end with data: [DONE]: ...{data[-300:]!r}"
            if streamed_text(data) != "You said: " + STREAM_PROMPT:
                return f"{label}: stream did not carry the whole answer: {data!r}"
        else:
            answer = json.loads(data)
            if (
                answer.get("success") != 1
                or answer["choices"][0]["message"]["content"] != "You said: ping"
            ):
                return f"{label}: not the answer expected: {data[:300]!r}"
        return None

    def start(self) -> None:
        plan: list[tuple[str, str, int, bool]] = [
            (f"stream-{n}", "stream", MAX_STREAMS_PER_WORKER, True) for n in range(STREAM_WORKERS)
        ]
        plan += [("short-keepalive", "short", MAX_SHORTS_PER_WORKER, True)]
        plan += [("short-new-conn", "short", MAX_SHORTS_PER_WORKER, False)]
        assert len(plan) == STREAM_WORKERS + SHORT_WORKERS
        for args in plan:
            thread = threading.Thread(target=self.worker, args=args, name=args[0], daemon=True)
            thread.start()
            self.threads.append(thread)

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(REQUEST_TIMEOUT + 5)
        assert not any(thread.is_alive() for thread in self.threads), "a load worker hung"

    def completed_between(self, kind: str, start: float, end: float) -> int:
        return sum(start <= t <= end for t in self.done[kind])


def streamed_text(data: bytes) -> str | None:
    """The answer text a stream's events carry, or None if one of them is an error."""
    text = []
    for line in data.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                return None
            text += [
                choice.get("delta", {}).get("content") or "" for choice in event.get("choices", [])
            ]
    return "".join(text)


def served_requests(port: str) -> float:
    """gateway_requests_total for /v1/gpt/chat answered 200, as any instance's /metrics shows it."""
    connection = http.client.HTTPConnection("127.0.0.1", int(port), timeout=10)
    try:
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
    finally:
        connection.close()
    return samples(text).get(series("gateway_requests_total", route="gpt_chat", status="200"), 0.0)


def post_json(url: str, obj: dict) -> None:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(
            "POST",
            "/_emulator/faults",
            body=json.dumps(obj),
            headers={"Content-Type": "application/json"},
        )
        response = connection.getresponse()
        assert response.status < 300, response.read()
    finally:
        connection.close()


def test_pm2_start_waits_for_ready_and_reload_under_load_drops_nothing(
    pm2: Pm2, shared_emulator: tuple[str, str]
) -> None:
    started = time.monotonic()
    pm2.run("start", "ecosystem.config.js")
    start_seconds = time.monotonic() - started
    before = pm2.wait_online(INSTANCES)
    processes = pm2.processes()
    assert {p["pm2_env"]["exec_mode"] for p in processes} == {"fork_mode"}
    assert {p["pm2_env"]["exec_interpreter"] for p in processes} == {
        str(ROOT / ".venv" / "bin" / "python")
    }
    # PM2 waits for each instance's "ready" (wait_ready) for up to listen_timeout,
    # one instance after the other: a start this quick means "ready" arrived.
    listen_timeout = min(p["pm2_env"]["listen_timeout"] for p in processes) / 1000
    assert start_seconds < listen_timeout, (
        f"pm2 start took {start_seconds:.1f} s: no ready message?\n{pm2.logs()}"
    )

    # Every chat answer (the emulator takes one fault per request) streams slowly.
    emulator_url, _ = shared_emulator
    post_json(emulator_url, {"chunk_gap": CHUNK_GAP, "times": 50000})
    assert all(p["pm2_env"]["restart_time"] == 0 for p in processes)

    load = Load(int(pm2.env["HTTP_PORT"]))
    load.start()
    try:
        load.warm.wait(REQUEST_TIMEOUT * 2)
        reload_started = time.monotonic()
        pm2.run("reload", APP)
        reload_ended = time.monotonic()
    finally:
        load.finish()
    after = pm2.wait_online(INSTANCES)

    assert not load.failures, (
        f"{len(load.failures)} request(s) failed during `pm2 reload` "
        f"(reload from {reload_started - load.started:.3f}s to {reload_ended - load.started:.3f}s):\n"
        + "\n".join(load.failures[:30])
        + "\n"
        + pm2.logs()
    )
    assert sorted(after) == sorted(before)
    assert not set(after.values()) & set(before.values()), (
        f"PIDs did not change: {before} -> {after}"
    )
    # Restarted once each, by the reload (a crash would have restarted them again).
    assert [p["pm2_env"]["restart_time"] for p in pm2.processes()] == [1] * INSTANCES
    # The load really overlapped the reload.
    assert load.completed_between("stream", reload_started, reload_ended) >= STREAM_WORKERS
    assert load.completed_between("short", reload_started, reload_ended) >= 20
    # Metrics are the sum over every instance, the replaced ones included.
    served = served_requests(pm2.env["HTTP_PORT"])
    assert served == len(load.done["stream"]) + len(load.done["short"]), served
    print(
        f"pm2 start {start_seconds:.2f}s, reload {reload_ended - reload_started:.2f}s, "
        f"{len(load.done['stream'])} streams and {len(load.done['short'])} short requests, no failure"
    )
