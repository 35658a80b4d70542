#!/usr/bin/env python3
"""The gateway's benchmark: one command, a table of figures against the performance targets.

    .venv/bin/python bench/run.py                  # the full run (3 to 4 minutes)
    .venv/bin/python bench/run.py --quick          # the smoke: about 10 seconds, same keys
    .venv/bin/python bench/run.py --json out.json  # results also here (default bench/results/latest.json)
    .venv/bin/python bench/run.py --profile        # also sample the server with py-spy under load

It starts bench/fast_upstream.py (the emulator's bytes from a bare asyncio
server), server.py pointed at it, and bench/reference_proxy.py (the bare
Tornado proxy some targets are stated as ratios to), drives them with wrk (the
Debian package; installed here when run as root with apt, else explained), and
with its own client (bench/loadgen.py) for what wrk cannot do. Everything runs
on 127.0.0.1 and every loop is bounded in count and time. bench/README.md says
what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import loadgen  # noqa: E402

KEY = "bench-upstream-key-5e1d"
CALLER_KEY = "bench-caller-key-91c4"  # API_KEYS: the server checks a caller key on every request
DEPLOYMENT = "gpt-4o"
API_VERSION = "2024-10-21"
# The stand-in answers this prompt with "You said:" + 18 words = 20 content events.
PROMPT = (
    "one two three four five six seven eight nine ten "
    "eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")
DEFAULT_MAX_CLIENTS = 1000  # gateway/config.py's default, the bound for upstream connections
WRK_INSTALL_HINT = (
    "wrk is not installed: `apt-get install -y wrk` (Debian/Ubuntu), then run this again."
)

# The targets.
TARGET_CPU_REQUEST_MS = 0.35
TARGET_CPU_STREAM_MS = 0.8
TARGET_ADDED_P50_MS = 0.4
TARGET_RPS = 3000  # 2x the original Express service's ~1,500 req/s on this kind of machine
TARGET_EVENT_MS = 2.0
TARGET_RSS_MB = 250
# ... and those stated as ratios to the reference proxy, measured in the same run.
TARGET_CPU_REQUEST_RATIO = 1.0
TARGET_CPU_STREAM_RATIO = 1.1


@dataclass(frozen=True)
class Route:
    name: str
    path: str
    body: dict
    stream_body: dict


MESSAGES = [{"role": "user", "content": PROMPT}]
ROUTES = {
    "gpt_chat": Route(
        "gpt_chat", "/v1/gpt/chat", {"prompt": PROMPT}, {"prompt": PROMPT, "stream": True}
    ),
    "openai": Route(
        "openai",
        "/v1/chat/completions",
        {"model": DEPLOYMENT, "messages": MESSAGES},
        {"model": DEPLOYMENT, "messages": MESSAGES, "stream": True},
    ),
    "azure": Route(
        "azure",
        f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}",
        {"messages": MESSAGES},
        {"messages": MESSAGES, "stream": True},
    ),
}
# The stand-in itself, as Azure: the "direct" baseline.
DIRECT = Route(
    "direct", ROUTES["azure"].path, {"messages": MESSAGES}, {"messages": MESSAGES, "stream": True}
)
# bench/reference_proxy.py, sent the OpenAI route's requests: the "reference" baseline.
REFERENCE = dataclasses.replace(ROUTES["openai"], name="reference")


@dataclass(frozen=True)
class Plan:
    quick: bool
    warmup: float  # seconds of load before each measured run, not counted
    duration: float  # seconds of each measured run (wrk takes whole seconds)
    connections: int
    sequential: int  # requests in the connection-reuse run
    timed_streams: int  # streams in the event-latency runs
    gap_ms: float  # gap between upstream events in the event-latency runs
    fast_gap_ms: float | None  # a second event-latency run at a fast token rate (None: none)
    spaced_gap_ms: float  # gap in the CPU-per-stream-with-spaced-events run
    pad: int  # content bytes of each content event in the large-event run
    held: int  # concurrent open streams in the memory run
    idle_window: float  # seconds over which the idle CPU of held streams is measured
    two_processes: bool


FULL = Plan(False, 1.0, 5.0, 50, 10_000, 10, 100.0, 10.0, 1.0, 65_536, 2000, 2.0, True)
QUICK = Plan(True, 0.05, 1.0, 50, 200, 3, 5.0, None, 1.0, 65_536, 50, 0.1, False)


# ---------------------------------------------------------------- processes


# The CPUs this script may use, read before it pins itself anywhere.
ALL_CPUS = frozenset(os.sched_getaffinity(0))


def all_cpus() -> set[int]:
    return set(ALL_CPUS)


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Pin every thread of `pid` (threads made later inherit from their maker)."""
    try:
        tasks = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        tasks = [pid]
    for tid in tasks:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:
            pass


@contextmanager
def own_affinity(cpus: set[int] | None) -> Iterator[None]:
    """Run a block (and the children it starts) on `cpus`; None leaves the affinity alone."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


# Server log lines that mean a run went wrong (plain or JSON log lines), and the expected ones.
# 499 (the caller left) is expected: wrk drops its in-flight requests when its time is up.
LOG_PROBLEM = re.compile(
    rb'Traceback| ERROR | WARNING | CRITICAL |"status":\s*(4(?!99)\d\d|5\d\d)|"level":\s*"(WARNING|ERROR)'
)
LOG_BENIGN = (b"no caller keys configured",)


def die_with_parent() -> None:
    """preexec_fn: the child gets SIGTERM when this script dies, however it dies (Linux prctl)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Proc:
    """A child process whose output goes to a file (a pipe could fill up and stall it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=die_with_parent,
        )
        self.pid = self.popen.pid
        try:  # room for thousands of sockets, whatever the shell's limit
            import resource

            _, hard = resource.prlimit(self.pid, resource.RLIMIT_NOFILE)
            wanted = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
            resource.prlimit(self.pid, resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError):
            pass

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        compiled = re.compile(pattern)
        while time.monotonic() < deadline:
            match = compiled.search(self.log_path.read_text(errors="replace"))
            if match:
                return match
            if self.popen.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not print {pattern!r}; its output:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all threads), from /proc."""
        with open(f"/proc/{self.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory_kb(self) -> dict[str, int]:
        values = {}
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    values[name] = int(rest.split()[0])
        return values

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        self._log.close()

    def log_problems(self) -> list[str]:
        """Lines of the server log that mean something went wrong: errors, warnings, tracebacks, 4xx/5xx."""
        problems = []
        with open(self.log_path, "rb") as log:
            for line in log:
                if LOG_PROBLEM.search(line) and not any(benign in line for benign in LOG_BENIGN):
                    problems.append(line.decode(errors="replace").strip())
        return problems


class Bench:
    """The processes of one run, and the measurements made with them."""

    def __init__(self, plan: Plan, args: argparse.Namespace, workdir: Path) -> None:
        self.plan = plan
        self.args = args
        self.workdir = workdir
        self.errors: list[str] = []
        self.procs: list[Proc] = []
        self.python = sys.executable
        self.pin = not args.no_pin and len(all_cpus()) >= 2
        self.server_cpus = {min(ALL_CPUS)} if self.pin else None
        self.load_cpus = all_cpus() - {min(ALL_CPUS)} if self.pin else None
        self.empty_env = workdir / "empty.env"
        self.empty_env.write_text("")
        self.extra_env = dict(item.split("=", 1) for item in args.server_env)
        self.extra_headers = dict(
            (name.strip(), value.strip())
            for name, value in (item.split(":", 1) for item in args.header)
        )
        self.wrk = shutil.which("wrk") if args.loadgen != "python" else None
        self.upstream: Proc | None = None
        self.upstream_port = 0

    # processes

    def start_upstream(self) -> None:
        proc = Proc(
            "fast_upstream",
            [self.python, str(BENCH / "fast_upstream.py"), "--port", "0", "--key", KEY],
            {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"},
            self.workdir / "fast_upstream.log",
        )
        self.procs.append(proc)
        self.upstream_port = int(proc.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        self.upstream = proc

    def start_server(
        self, name: str, port: int = 0, cpus: set[int] | None = None, **env: str
    ) -> tuple[Proc, int]:
        environ = {
            "PATH": os.environ.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
            "ENV_FILE": str(self.empty_env),
            "ENDPOINT": f"http://127.0.0.1:{self.upstream_port}",
            "DEPLOYMENT_NAME": DEPLOYMENT,
            "API_VERSION": API_VERSION,
            "KEY": KEY,
            "HOST": "127.0.0.1",
            "HTTP_PORT": str(port),
            "DRAIN_TIMEOUT": "2",
            **({} if self.args.open else {"API_KEYS": CALLER_KEY}),
            **self.extra_env,
            **env,
        }
        proc = Proc(
            name,
            [self.python, *self.args.server_script.split()],
            environ,
            self.workdir / f"{name}.log",
        )
        if cpus is not None:
            set_affinity(proc.pid, cpus)
        self.procs.append(proc)
        bound = int(proc.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        return proc, bound

    def start_reference(self) -> tuple[Proc, int]:
        """bench/reference_proxy.py in front of the stand-in, on the server's CPUs."""
        proc = Proc(
            "reference",
            [
                self.python,
                str(BENCH / "reference_proxy.py"),
                "--port",
                "0",
                "--key",
                KEY,
                "--upstream",
                f"http://127.0.0.1:{self.upstream_port}{DIRECT.path}",
            ],
            {"PATH": os.environ.get("PATH", ""), "PYTHONUNBUFFERED": "1"},
            self.workdir / "reference.log",
        )
        if self.server_cpus is not None:
            set_affinity(proc.pid, self.server_cpus)
        self.procs.append(proc)
        bound = int(proc.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        return proc, bound

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc.name.startswith(("server", "reference")):
            problems = proc.log_problems()
            if problems:
                self.errors.append(
                    f"{proc.name} logged {len(problems)} problem line(s), first: {problems[0]}"
                )
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)

    # the stand-in's control routes

    def upstream_get(self, path: str) -> dict:
        return asyncio.run(loadgen.get_json("127.0.0.1", self.upstream_port, path))

    def upstream_conns(self) -> int:
        return self.upstream_get("/_bench/stats")["connections_accepted"]

    def configure_upstream(self, **query: float) -> None:
        q = "&".join(f"{name}={value}" for name, value in query.items())
        self.upstream_get(f"/_bench/config?{q}")

    # request shapes

    def request_parts(self, route: Route, stream: bool) -> tuple[bytes, dict[str, str]]:
        body = json.dumps(
            route.stream_body if stream else route.body, separators=(",", ":")
        ).encode()
        headers = {"Content-Type": "application/json"}
        if route is DIRECT:
            headers["api-key"] = KEY
        else:
            if not self.args.open:
                headers["api-key"] = CALLER_KEY
            headers.update(self.extra_headers)
        return body, headers

    # load

    def run_load(
        self,
        port: int,
        route: Route,
        stream: bool,
        connections: int,
        duration: float,
        generator: str | None = None,
    ) -> dict:
        """One measured run: wrk when present (whole seconds), else the Python loop."""
        body, headers = self.request_parts(route, stream)
        use = generator or ("wrk" if self.wrk else "python")
        if use == "wrk":
            return run_wrk(
                self.wrk,
                self.workdir,
                port,
                route.path,
                body,
                headers,
                connections,
                max(1, round(duration)),
            )
        raw = loadgen.build_request("POST", route.path, body, headers)
        return asyncio.run(
            loadgen.load("127.0.0.1", port, raw, connections=connections, duration=duration)
        )

    def warm(self, port: int, route: Route, stream: bool, connections: int) -> None:
        if self.plan.warmup <= 0:
            return
        body, headers = self.request_parts(route, stream)
        raw = loadgen.build_request("POST", route.path, body, headers)
        asyncio.run(
            loadgen.load("127.0.0.1", port, raw, connections=connections, duration=self.plan.warmup)
        )

    def measured(
        self,
        label: str,
        servers: list[Proc],
        port: int,
        route: Route,
        stream: bool,
        connections: int,
        generator: str | None = None,
        duration: float | None = None,
        profile_to: Path | None = None,
    ) -> dict:
        """A load run with the servers' CPU time and the upstream connections it cost."""
        self.warm(port, route, stream, connections)
        assert self.upstream is not None
        cpu0 = [proc.cpu_seconds() for proc in servers]
        up_cpu0 = self.upstream.cpu_seconds()
        conns0 = self.upstream_conns()
        spy = (
            start_profiler(servers[0].pid, duration or self.plan.duration, profile_to)
            if profile_to
            else None
        )
        result = self.run_load(
            port, route, stream, connections, duration or self.plan.duration, generator
        )
        if spy is not None:
            finish_profiler(spy)
        conns = self.upstream_conns() - conns0
        each = [proc.cpu_seconds() - before for proc, before in zip(servers, cpu0)]
        cpu = sum(each)
        up_cpu = self.upstream.cpu_seconds() - up_cpu0
        requests = result["requests"]
        if servers:
            result["server_cpu_s"] = cpu
            result["server_cpu_s_each"] = each  # with 2 processes: how SO_REUSEPORT shared the work
            result["server_cpu_ms_per_request"] = cpu * 1000 / requests if requests else math.nan
            result["server_cpu_percent"] = (
                100 * cpu / result["duration_s"] if result["duration_s"] else math.nan
            )
        result["upstream_cpu_ms_per_request"] = up_cpu * 1000 / requests if requests else math.nan
        result["upstream_connections_opened"] = conns
        result["upstream_connections_per_10k"] = conns * 10_000 / requests if requests else math.nan
        errors = {kind: count for kind, count in result["errors"].items() if count}
        if errors or not requests:
            self.errors.append(f"{label}: {requests} requests, errors {errors}")
        return result

    # checks and special runs

    def sanity(self, port: int, route: Route) -> None:
        """One request of each kind: a 200 with the stand-in's answer, 20 content events streamed."""
        for stream in (False, True):
            body, headers = self.request_parts(route, stream)
            try:
                response = asyncio.run(
                    loadgen.fetch("127.0.0.1", port, "POST", route.path, body, headers)
                )
            except Exception as error:  # noqa: BLE001 - reported, not raised
                self.errors.append(
                    f"{route.name} sanity ({'stream' if stream else 'non-stream'}): {error!r}"
                )
                continue
            content_events = response.body.count(b'"delta":{"content":"')
            ok = response.status == 200 and (
                (content_events == 20 and response.body.rstrip().endswith(b"data: [DONE]"))
                if stream
                else b"You said: one two" in response.body
            )
            if not ok:
                self.errors.append(
                    f"{route.name} sanity ({'stream' if stream else 'non-stream'}): status {response.status}, "
                    f"{content_events} content events, body {response.body[:200]!r}"
                )

    def event_latency(
        self, port: int, route: Route, pad: int = 0, gap_ms: float | None = None
    ) -> dict:
        """Per-event latency from the stand-in's write to this client, events `gap_ms` apart."""
        gap_ms = gap_ms or self.plan.gap_ms
        self.configure_upstream(gap_ms=gap_ms, pad=pad)
        body, headers = self.request_parts(route, True)

        async def sent_times(request_id: str) -> list[list[int]]:
            answer = await loadgen.get_json(
                "127.0.0.1", self.upstream_port, f"/_bench/sent?id={request_id}"
            )
            return answer["sent"]

        try:
            result = asyncio.run(
                loadgen.timed_streams(
                    "127.0.0.1",
                    port,
                    route.path,
                    body,
                    headers,
                    streams=self.plan.timed_streams,
                    tag=f"bench-{route.name}",
                    sent_times=sent_times,
                    timeout=30 + 30 * gap_ms / 1000,
                    stagger=gap_ms / 1000 / self.plan.timed_streams,
                )
            )
        finally:
            self.configure_upstream()
        result.update({"gap_ms": gap_ms, "content_event_bytes": pad or None})
        for error in result["errors"][:3]:
            self.errors.append(f"{route.name} event latency: {error}")
        return result

    def sequential(self, port: int, route: Route) -> dict:
        """`plan.sequential` requests one after another on one connection; upstream connections opened."""
        body, headers = self.request_parts(route, False)
        raw = loadgen.build_request("POST", route.path, body, headers)
        conns0 = self.upstream_conns()
        result = asyncio.run(
            loadgen.load(
                "127.0.0.1",
                port,
                raw,
                connections=1,
                duration=120,
                max_requests=self.plan.sequential,
            )
        )
        opened = self.upstream_conns() - conns0
        errors = {kind: count for kind, count in result["errors"].items() if count}
        if errors or result["requests"] != self.plan.sequential:
            self.errors.append(
                f"{route.name} sequential: {result['requests']} requests, errors {errors}"
            )
        return {
            "requests": result["requests"],
            "upstream_connections_opened": opened,
            "upstream_connections_per_10k": opened * 10_000 / result["requests"]
            if result["requests"]
            else math.nan,
            "max_clients": int(self.extra_env.get("MAX_CLIENTS", DEFAULT_MAX_CLIENTS)),
            "p50_ms": result["latency_ms"]["p50"],
        }

    def held_streams(self, route: Route, server: Proc | None, port: int | None) -> dict:
        """`plan.held` streams open at once through one server: its memory, and that all of them end well."""
        plan = self.plan
        # Each open stream holds one upstream transfer: MAX_CLIENTS must allow them all
        # (unless --server-env sets it, to see what a smaller pool does).
        max_clients = int(self.extra_env.get("MAX_CLIENTS", max(DEFAULT_MAX_CLIENTS, plan.held)))
        own = server is None
        if own:
            server, port = self.start_server(
                f"server-held-{route.name}",
                cpus=self.server_cpus,
                **{"MAX_CLIENTS": str(max_clients)},
            )
        assert server is not None and port is not None
        baseline = server.memory_kb()
        self.configure_upstream(hold=2)
        body, headers = self.request_parts(route, True)

        async def on_all_open(opened: int) -> dict:
            await asyncio.sleep(min(1.0, plan.idle_window))
            cpu0 = server.cpu_seconds()
            await asyncio.sleep(plan.idle_window)
            idle_cpu = server.cpu_seconds() - cpu0
            memory = server.memory_kb()
            stats = await loadgen.get_json("127.0.0.1", self.upstream_port, "/_bench/stats")
            await loadgen.get_json("127.0.0.1", self.upstream_port, "/_bench/release")
            return {
                "rss_mb": memory.get("VmRSS", 0) / 1024,
                "rss_peak_mb": memory.get("VmHWM", 0) / 1024,
                "rss_before_mb": baseline.get("VmRSS", 0) / 1024,
                "idle_cpu_percent": 100 * idle_cpu / plan.idle_window,
                "upstream_streams_held": stats["streams_held"],
            }

        try:
            result = asyncio.run(
                loadgen.held_streams(
                    "127.0.0.1",
                    port,
                    route.path,
                    body,
                    headers,
                    streams=plan.held,
                    connect_parallel=100,
                    open_timeout=60 if not plan.quick else 10,
                    on_all_open=on_all_open,
                    finish_timeout=90 if not plan.quick else 10,
                )
            )
        finally:
            self.configure_upstream()
            self.upstream_get("/_bench/release")
            if own:
                self.stop(server)
        result["max_clients"] = (
            max_clients if own else int(self.extra_env.get("MAX_CLIENTS", DEFAULT_MAX_CLIENTS))
        )
        if result["dropped"] or result["opened"] < plan.held:
            self.errors.append(
                f"{route.name} held streams: {result['opened']} of {plan.held} opened, {result['dropped']} dropped "
                f"{result['errors'][:2]}"
            )
        return result

    def two_processes(self, route: Route) -> dict:
        """Non-stream throughput of one server process, then of two sharing the port (nothing pinned)."""
        everywhere = all_cpus()
        assert self.upstream is not None
        set_affinity(self.upstream.pid, everywhere)
        try:
            with own_affinity(everywhere):
                first, port = self.start_server(f"server-1of2-{route.name}")
                try:
                    one = self.measured(
                        f"{route.name} 1 process",
                        [first],
                        port,
                        route,
                        False,
                        self.plan.connections,
                    )
                    second, _ = self.start_server(f"server-2of2-{route.name}", port=port)
                    try:
                        two = self.measured(
                            f"{route.name} 2 processes",
                            [first, second],
                            port,
                            route,
                            False,
                            self.plan.connections,
                        )
                    finally:
                        self.stop(second)
                finally:
                    self.stop(first)
        finally:
            if self.load_cpus is not None:
                set_affinity(self.upstream.pid, self.load_cpus)
        return {
            "one_process": slim(one),
            "two_processes": slim(two),
            "speedup": two["rps"] / one["rps"] if one["rps"] else math.nan,
            "pinned": False,
        }


# ---------------------------------------------------------------- wrk

WRK_LUA = """
wrk.method = "POST"
wrk.body = [==[{body}]==]
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {{"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}},' ..
    '"latency_us":{{"p50":%.1f,"p90":%.1f,"p99":%.1f,"max":%.1f,"mean":%.1f}}}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def run_wrk(
    wrk: str,
    workdir: Path,
    port: int,
    path: str,
    body: bytes,
    headers: dict[str, str],
    connections: int,
    seconds: int,
) -> dict:
    text = body.decode()
    if "]==]" in text:
        raise ValueError("request body cannot be embedded in the wrk script")
    header_lines = "\n".join(
        f'wrk.headers["{name}"] = "{value}"' for name, value in headers.items()
    )
    script = workdir / f"wrk-{abs(hash((path, body, tuple(headers.items()))))}.lua"
    script.write_text(WRK_LUA.format(body=text, headers=header_lines))
    command = [
        wrk,
        "-t1",
        f"-c{connections}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"http://127.0.0.1:{port}{path}",
    ]
    completed = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 30, preexec_fn=die_with_parent
    )
    match = re.search(r"^WRK_JSON (.*)$", completed.stdout, re.M)
    if completed.returncode != 0 or not match:
        raise RuntimeError(
            f"wrk failed ({completed.returncode}): {completed.stdout}{completed.stderr}"
        )
    raw = json.loads(match.group(1))
    duration = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "duration_s": duration,
        "rps": raw["requests"] / duration if duration else 0.0,
        "latency_ms": {name: value / 1000 for name, value in raw["latency_us"].items()},
        "errors": raw["errors"],
        "generator": "wrk",
    }


def wrk_version(wrk: str | None) -> str | None:
    if not wrk:
        return None
    completed = subprocess.run([wrk, "--version"], capture_output=True, text=True)
    match = re.search(r"wrk\s+(\S+)", completed.stdout + completed.stderr)
    return match.group(1) if match else "unknown"


def ensure_wrk(quick: bool, loadgen_choice: str) -> str | None:
    """wrk's path; the full run installs it (root with apt) or explains; the smoke uses Python instead."""
    if loadgen_choice == "python":
        return None
    found = shutil.which("wrk")
    if found or quick:
        if not found:
            print(
                "wrk not found: the smoke run uses the built-in Python load loop. "
                + WRK_INSTALL_HINT
            )
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk not found: installing it with apt-get ...", flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, stdout=subprocess.DEVNULL)
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "wrk"],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
        )
        found = shutil.which("wrk")
    if not found:
        print(WRK_INSTALL_HINT, file=sys.stderr)
        print(
            "Or run with --loadgen python (a weaker generator: its own CPU use lowers the figures).",
            file=sys.stderr,
        )
    return found


# ---------------------------------------------------------------- profiling


def start_profiler(pid: int, seconds: float, output: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(spy):
        print("py-spy not found (pip install py-spy): no profile taken", file=sys.stderr)
        return None
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            "250",
            "--format",
            "raw",
            "--output",
            str(output),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(output.with_suffix(".log"), "wb"),
        preexec_fn=die_with_parent,
    )


def finish_profiler(spy: subprocess.Popen) -> None:
    try:
        spy.wait(30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait(5)


FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]+?)(?::\d+)?\)$")


def frame_name(frame: str) -> tuple[str, str]:
    """`func (tornado/web.py:12)` -> ("func (tornado/web.py)", "tornado/web.py")."""
    match = FRAME.match(frame.strip())
    if not match:
        return frame.strip(), frame.strip()
    path = match.group("file")
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = (
                path.split(marker, 1)[1].split("/", 1)[-1]
                if marker == "/lib/python3."
                else path.split(marker, 1)[1]
            )
            break
    if path.startswith(str(ROOT) + "/"):
        path = path[len(str(ROOT)) + 1 :]
    return f"{match.group('func')} ({path})", path


def module_group(path: str) -> str:
    """Where a frame's code lives, coarsely: `tornado/web.py` stays, `jsonschema/x.py` -> `jsonschema`."""
    if path.startswith(("tornado/", "gateway/", "handlers/")):
        return path
    return path.split("/", 1)[0] if "/" in path else path


def summarise_profile(path: Path, top: int = 15) -> dict:
    """Self and inclusive sample shares per function, and self share per module, from py-spy's stacks."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    module_counts: Counter[str] = Counter()
    samples = 0
    if not path.exists():
        return {"samples": 0, "self": [], "inclusive": [], "modules": []}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";") if frame.strip()]
        if not frames:
            continue
        samples += count
        self_counts[frames[-1][0]] += count
        module_counts[module_group(frames[-1][1])] += count
        for name in {name for name, _ in frames}:
            total_counts[name] += count

    def share(counter: Counter[str], limit: int = top) -> list[dict]:
        return [
            {"function": name, "percent": round(100 * count / samples, 1)}
            for name, count in counter.most_common(limit)
        ]

    return {
        "samples": samples,
        "self": share(self_counts),
        "inclusive": share(total_counts, 40),
        "modules": share(module_counts),
    }


# ---------------------------------------------------------------- the run


def slim(result: dict) -> dict:
    """The fields of a load run worth keeping in the JSON."""
    keep = (
        "rps",
        "requests",
        "duration_s",
        "latency_ms",
        "errors",
        "generator",
        "server_cpu_ms_per_request",
        "server_cpu_percent",
        "server_cpu_s_each",
        "upstream_cpu_ms_per_request",
        "upstream_connections_opened",
        "upstream_connections_per_10k",
    )
    return {name: result[name] for name in keep if name in result}


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def others_busy() -> str | None:
    """A warning when other processes already keep the CPUs busy: the figures would be low and noisy."""
    idle0 = _idle_ticks()
    time.sleep(0.5)
    idle1 = _idle_ticks()
    if idle0 is None or idle1 is None:
        return None
    busy = 1 - (idle1 - idle0) / (CLK_TCK * 0.5 * (os.cpu_count() or 1))
    if busy > 0.15:
        return f"the CPUs were {busy:.0%} busy before the run started: other work on this machine skews the figures"
    return None


def _idle_ticks() -> int | None:
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()
        return int(fields[4]) + int(fields[5])  # idle + iowait
    except (OSError, ValueError, IndexError):
        return None


def git_commit() -> str | None:
    try:
        completed = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (
            completed.stdout.strip() + ("+dirty" if dirty else "")
            if completed.returncode == 0
            else None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def run(plan: Plan, args: argparse.Namespace) -> dict:
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="azure-gpt-bench-"))
    bench = Bench(plan, args, workdir)
    routes = [ROUTES[name] for name in args.routes.split(",")]
    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "mode": "quick" if plan.quick else "full",
            **machine(),
            "git": git_commit(),
            "load_generator": "wrk" if bench.wrk else "python",
            "wrk_version": wrk_version(bench.wrk),
            "caller_keys": not args.open,
            "pinned": bench.pin,
            "pinning": f"server and reference proxy on CPU {min(ALL_CPUS)}; load generator, stand-in and "
            "this script on the rest"
            if bench.pin
            else "none",
            "loadavg_before": loadavg(),
            "plan": dataclasses.asdict(plan),
            "routes": [route.path for route in routes],
            "logs": str(workdir),
        },
        "direct": {},
        "reference": {},
        "routes": {},
        "profile": {},
        "errors": bench.errors,
    }
    profile_dir = Path(args.json).resolve().parent if args.profile else None
    if profile_dir:
        profile_dir.mkdir(parents=True, exist_ok=True)
    busy = others_busy()
    deadline = time.monotonic() + args.wait_quiet
    if busy and args.wait_quiet:
        print(f"waiting up to {args.wait_quiet:g} s for the CPUs to be idle ...", flush=True)
        while busy and time.monotonic() < deadline:
            time.sleep(2)
            busy = others_busy()
    results["meta"]["cpu_busy_before"] = busy
    if busy:
        print(f"warning: {busy}", flush=True)
    if bench.load_cpus is not None:
        os.sched_setaffinity(0, bench.load_cpus)

    def phase(label: str, call: Callable[[], Any]) -> Any:
        print(f"  {label} ...", end="", flush=True)
        began = time.monotonic()
        try:
            return call()
        except Exception as error:  # noqa: BLE001 - a failed phase is reported and the run goes on
            bench.errors.append(f"{label}: {type(error).__name__}: {error}")
            return None
        finally:
            print(f" {time.monotonic() - began:.1f} s", flush=True)

    try:
        bench.start_upstream()
        server, port = bench.start_server("server", cpus=bench.server_cpus)
        for route in routes:
            bench.sanity(port, route)
        # wrk runs last whole seconds: the smoke uses it for the non-stream 50-connection runs
        # only, and the Python client, for fractions of a second, for the rest. The full run
        # uses wrk for every load run.
        short_generator = None if not plan.quick else "python"
        short_duration = plan.duration if not plan.quick else 0.2
        direct = results["direct"]
        direct["nonstream_c1"] = phase(
            "direct non-stream, 1 connection",
            lambda: slim(
                bench.measured(
                    "direct nonstream c1",
                    [],
                    bench.upstream_port,
                    DIRECT,
                    False,
                    1,
                    short_generator,
                    short_duration,
                )
            ),
        )
        direct["stream_c1"] = phase(
            "direct stream, 1 connection",
            lambda: slim(
                bench.measured(
                    "direct stream c1",
                    [],
                    bench.upstream_port,
                    DIRECT,
                    True,
                    1,
                    short_generator,
                    short_duration,
                )
            ),
        )
        if not plan.quick:
            direct["nonstream_c50"] = phase(
                "direct non-stream, 50 connections",
                lambda: slim(
                    bench.measured(
                        "direct nonstream c50",
                        [],
                        bench.upstream_port,
                        DIRECT,
                        False,
                        plan.connections,
                    )
                ),
            )
            direct["stream_c50"] = phase(
                "direct stream, 50 connections",
                lambda: slim(
                    bench.measured(
                        "direct stream c50", [], bench.upstream_port, DIRECT, True, plan.connections
                    )
                ),
            )
        direct["events"] = phase(
            "direct event latency", lambda: bench.event_latency(bench.upstream_port, DIRECT)
        )
        if plan.fast_gap_ms:
            direct["events_fast"] = phase(
                f"direct event latency, events {plan.fast_gap_ms:g} ms apart",
                lambda: bench.event_latency(bench.upstream_port, DIRECT, gap_ms=plan.fast_gap_ms),
            )
        direct["events_large"] = phase(
            "direct event latency, large events",
            lambda: bench.event_latency(bench.upstream_port, DIRECT, plan.pad),
        )

        def spaced(proc: Proc, port: int, route: Route) -> dict:
            bench.configure_upstream(gap_ms=plan.spaced_gap_ms)
            try:
                result = slim(
                    bench.measured(
                        f"{route.name} stream spaced",
                        [proc],
                        port,
                        route,
                        True,
                        plan.connections,
                        short_generator,
                        short_duration,
                    )
                )
            finally:
                bench.configure_upstream()
            result["gap_ms"] = plan.spaced_gap_ms
            return result

        def proxied(proc: Proc, port: int, route: Route, out: dict[str, Any]) -> None:
            """The runs a route and the reference share: throughput and CPU at 50 connections, latency at 1."""
            out["nonstream_c50"] = phase(
                "non-stream, 50 connections",
                lambda: slim(
                    bench.measured(
                        f"{route.name} nonstream c50", [proc], port, route, False, plan.connections
                    )
                ),
            )
            out["stream_c50"] = phase(
                "stream, 50 connections",
                lambda: slim(
                    bench.measured(
                        f"{route.name} stream c50",
                        [proc],
                        port,
                        route,
                        True,
                        plan.connections,
                        short_generator,
                        None if not plan.quick else short_duration,
                    )
                ),
            )
            out["nonstream_c1"] = phase(
                "non-stream, 1 connection",
                lambda: slim(
                    bench.measured(
                        f"{route.name} nonstream c1",
                        [proc],
                        port,
                        route,
                        False,
                        1,
                        short_generator,
                        short_duration,
                    )
                ),
            )
            out["stream_c1"] = phase(
                "stream, 1 connection",
                lambda: slim(
                    bench.measured(
                        f"{route.name} stream c1",
                        [proc],
                        port,
                        route,
                        True,
                        1,
                        short_generator,
                        short_duration,
                    )
                ),
            )
            out["stream_spaced_c50"] = phase(
                f"stream, events {plan.spaced_gap_ms:g} ms apart", lambda: spaced(proc, port, route)
            )
            for kind in ("nonstream", "stream"):
                through, base = out.get(f"{kind}_c1"), direct.get(f"{kind}_c1")
                out[f"{kind}_added_p50_ms"] = (
                    through["latency_ms"]["p50"] - base["latency_ms"]["p50"]
                    if through and base
                    else None
                )

        print(f"reference (bench/reference_proxy.py, {REFERENCE.path} requests)", flush=True)
        reference = results["reference"]
        reference["path"] = REFERENCE.path
        reference_proc, reference_port = bench.start_reference()
        bench.sanity(reference_port, REFERENCE)
        proxied(reference_proc, reference_port, REFERENCE, reference)
        bench.stop(reference_proc)

        for route in routes:
            print(f"{route.name} ({route.path})", flush=True)
            out: dict[str, Any] = {"path": route.path}
            results["routes"][route.name] = out

            def prof(kind: str) -> Path | None:
                return profile_dir / f"profile-{route.name}-{kind}.txt" if profile_dir else None

            proxied(server, port, route, out)
            for kind in ("nonstream", "stream", "stream_spaced"):
                mine = dig(out, f"{kind}_c50", "server_cpu_ms_per_request")
                theirs = dig(reference, f"{kind}_c50", "server_cpu_ms_per_request")
                out[f"{kind}_cpu_vs_reference"] = (
                    mine / theirs if mine is not None and theirs else None
                )
            if profile_dir:  # runs of their own: sampling must not touch the measured ones
                for kind, stream in (("nonstream", False), ("stream", True)):
                    phase(
                        f"profile {kind}, 50 connections",
                        lambda: bench.measured(
                            f"{route.name} {kind} profiled",
                            [server],
                            port,
                            route,
                            stream,
                            plan.connections,
                            profile_to=prof(kind),
                        ),
                    )

            out["events"] = phase(
                f"event latency, events {plan.gap_ms:g} ms apart",
                lambda: bench.event_latency(port, route),
            )
            if plan.fast_gap_ms:
                out["events_fast"] = phase(
                    f"event latency, events {plan.fast_gap_ms:g} ms apart",
                    lambda: bench.event_latency(port, route, gap_ms=plan.fast_gap_ms),
                )
            out["events_large"] = phase(
                f"event latency, {plan.pad} B content events",
                lambda: bench.event_latency(port, route, plan.pad),
            )
            out["sequential"] = phase(
                f"{plan.sequential} sequential requests", lambda: bench.sequential(port, route)
            )
            out["held_streams"] = phase(
                f"{plan.held} concurrent open streams",
                lambda: bench.held_streams(
                    route, server if plan.quick else None, port if plan.quick else None
                ),
            )
            if plan.two_processes:
                out["two_processes"] = phase("1 vs 2 processes", lambda: bench.two_processes(route))
            else:
                out["two_processes"] = {"skipped": "quick run"}
        if profile_dir:
            for route in routes:
                for kind in ("nonstream", "stream"):
                    results["profile"][f"{route.name}_{kind}"] = summarise_profile(
                        profile_dir / f"profile-{route.name}-{kind}.txt"
                    )
        if not server.alive():
            bench.errors.append(f"the server exited during the run:\n{server.tail()}")
    except Exception as error:  # noqa: BLE001
        bench.errors.append(f"run aborted: {type(error).__name__}: {error}")
    finally:
        bench.stop_all()
        if not bench.errors and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
            results["meta"]["logs"] = None
    results["meta"]["loadavg_after"] = loadavg()
    results["targets"] = judge(results, plan)
    results["meta"]["seconds"] = round(time.monotonic() - started, 1)
    results["ok"] = not bench.errors
    return results


# ---------------------------------------------------------------- judging and the table


def dig(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or obj.get(key) is None:
            return None
        obj = obj[key]
    return obj


def judge(results: dict, plan: Plan) -> list[dict]:
    """Each target, per route: the measured value and whether it is met."""
    held = plan.held
    checks = [
        (
            "cpu_ms_per_nonstream_request",
            ("nonstream_c50", "server_cpu_ms_per_request"),
            "<=",
            TARGET_CPU_REQUEST_MS,
        ),
        (
            "cpu_ms_per_stream",
            ("stream_c50", "server_cpu_ms_per_request"),
            "<=",
            TARGET_CPU_STREAM_MS,
        ),
        (
            "cpu_ms_per_stream_spaced_events",
            ("stream_spaced_c50", "server_cpu_ms_per_request"),
            "<=",
            TARGET_CPU_STREAM_MS,
        ),
        (
            "cpu_ms_per_nonstream_request_vs_reference",
            ("nonstream_cpu_vs_reference",),
            "<=",
            TARGET_CPU_REQUEST_RATIO,
        ),
        (
            "cpu_ms_per_stream_vs_reference",
            ("stream_cpu_vs_reference",),
            "<=",
            TARGET_CPU_STREAM_RATIO,
        ),
        (
            "cpu_ms_per_stream_spaced_events_vs_reference",
            ("stream_spaced_cpu_vs_reference",),
            "<=",
            TARGET_CPU_STREAM_RATIO,
        ),
        ("added_p50_ms_1_connection", ("nonstream_added_p50_ms",), "<=", TARGET_ADDED_P50_MS),
        ("nonstream_rps_1_process", ("nonstream_c50", "rps"), ">=", TARGET_RPS),
        ("first_event_ms_max", ("events", "first_event_ms", "max"), "<=", TARGET_EVENT_MS),
        ("any_event_ms_p99", ("events", "any_event_ms", "p99"), "<=", TARGET_EVENT_MS),
        (
            "any_event_ms_p99_fast_tokens",
            ("events_fast", "any_event_ms", "p99"),
            "<=",
            TARGET_EVENT_MS,
        ),
        ("any_large_event_ms_p99", ("events_large", "any_event_ms", "p99"), "<=", TARGET_EVENT_MS),
        (
            "upstream_connections_per_10k_sequential",
            ("sequential", "upstream_connections_per_10k"),
            "<=",
            DEFAULT_MAX_CLIENTS,
        ),
        (f"rss_mb_{held}_open_streams", ("held_streams", "rss_mb"), "<=", TARGET_RSS_MB),
        (f"streams_dropped_of_{held}", ("held_streams", "dropped"), "<=", 0),
    ]
    targets = []
    for route, out in results["routes"].items():
        for name, keys, op, target in checks:
            value = dig(out, *keys)
            met = None
            if isinstance(value, (int, float)) and not math.isnan(value):
                met = value <= target if op == "<=" else value >= target
            targets.append(
                {
                    "metric": name,
                    "route": route,
                    "value": value,
                    "op": op,
                    "target": target,
                    "met": met,
                }
            )
    return targets


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and abs(value) >= 100:
        return f"{value:,.0f}"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def table(results: dict) -> str:
    plan = results["meta"]["plan"]
    routes = list(results["routes"])
    direct = results["direct"]
    reference = results["reference"]
    targets = {(t["route"], t["metric"]): t for t in results["targets"]}
    held = plan["held"]

    def ceiling(cpu_ms: Any) -> float | None:
        return 1000 / cpu_ms if isinstance(cpu_ms, (int, float)) and cpu_ms > 0 else None

    def pair(a: Any, b: Any) -> str:
        return f"{fmt(a)} / {fmt(b)}"

    def triple(obj: dict, key: str) -> str:
        if dig(obj, key) is None:
            return "-"
        return " / ".join(
            fmt(dig(obj, key, "any_event_ms", name)) for name in ("p50", "p99", "max")
        )

    rows: list[tuple[str, Callable[[dict], str], bool, str, str | None]] = [
        # label, value of a route's results, whether the reference has it too, direct value, target metric name
        (
            "Non-stream req/s, 50 conns",
            lambda r: fmt(dig(r, "nonstream_c50", "rps")),
            True,
            fmt(dig(direct, "nonstream_c50", "rps")),
            "nonstream_rps_1_process",
        ),
        (
            "  server CPU busy during that run (%)",
            lambda r: fmt(dig(r, "nonstream_c50", "server_cpu_percent"), 0),
            True,
            "",
            None,
        ),
        (
            "  req/s one fully busy core would give (1000 / CPU ms)",
            lambda r: fmt(ceiling(dig(r, "nonstream_c50", "server_cpu_ms_per_request"))),
            True,
            "",
            None,
        ),
        (
            "Non-stream p50 / p99 ms, 50 conns",
            lambda r: pair(
                dig(r, "nonstream_c50", "latency_ms", "p50"),
                dig(r, "nonstream_c50", "latency_ms", "p99"),
            ),
            True,
            pair(
                dig(direct, "nonstream_c50", "latency_ms", "p50"),
                dig(direct, "nonstream_c50", "latency_ms", "p99"),
            ),
            None,
        ),
        (
            "Stream req/s, 50 conns (20 content events)",
            lambda r: fmt(dig(r, "stream_c50", "rps")),
            True,
            fmt(dig(direct, "stream_c50", "rps")),
            None,
        ),
        (
            "Stream p50 / p99 ms, 50 conns",
            lambda r: pair(
                dig(r, "stream_c50", "latency_ms", "p50"), dig(r, "stream_c50", "latency_ms", "p99")
            ),
            True,
            pair(
                dig(direct, "stream_c50", "latency_ms", "p50"),
                dig(direct, "stream_c50", "latency_ms", "p99"),
            ),
            None,
        ),
        (
            "Non-stream p50 ms, 1 conn",
            lambda r: fmt(dig(r, "nonstream_c1", "latency_ms", "p50"), 3),
            True,
            fmt(dig(direct, "nonstream_c1", "latency_ms", "p50"), 3),
            None,
        ),
        (
            "  added by the server (p50 ms)",
            lambda r: fmt(dig(r, "nonstream_added_p50_ms"), 3),
            True,
            "",
            "added_p50_ms_1_connection",
        ),
        (
            "Stream p50 ms, 1 conn",
            lambda r: fmt(dig(r, "stream_c1", "latency_ms", "p50"), 3),
            True,
            fmt(dig(direct, "stream_c1", "latency_ms", "p50"), 3),
            None,
        ),
        (
            "  added by the server (p50 ms)",
            lambda r: fmt(dig(r, "stream_added_p50_ms"), 3),
            True,
            "",
            None,
        ),
        (
            "Server CPU ms / non-stream request",
            lambda r: fmt(dig(r, "nonstream_c50", "server_cpu_ms_per_request"), 3),
            True,
            "",
            "cpu_ms_per_nonstream_request",
        ),
        (
            "  × the reference's",
            lambda r: fmt(dig(r, "nonstream_cpu_vs_reference")),
            False,
            "",
            "cpu_ms_per_nonstream_request_vs_reference",
        ),
        (
            "Server CPU ms / stream (events back to back)",
            lambda r: fmt(dig(r, "stream_c50", "server_cpu_ms_per_request"), 3),
            True,
            "",
            "cpu_ms_per_stream",
        ),
        (
            "  × the reference's",
            lambda r: fmt(dig(r, "stream_cpu_vs_reference")),
            False,
            "",
            "cpu_ms_per_stream_vs_reference",
        ),
        (
            f"Server CPU ms / stream (events {plan['spaced_gap_ms']:g} ms apart)",
            lambda r: fmt(dig(r, "stream_spaced_c50", "server_cpu_ms_per_request"), 3),
            True,
            "",
            "cpu_ms_per_stream_spaced_events",
        ),
        (
            "  × the reference's",
            lambda r: fmt(dig(r, "stream_spaced_cpu_vs_reference")),
            False,
            "",
            "cpu_ms_per_stream_spaced_events_vs_reference",
        ),
        (
            "Stand-in CPU ms / non-stream request",
            lambda r: fmt(dig(r, "nonstream_c50", "upstream_cpu_ms_per_request"), 3),
            True,
            "",
            None,
        ),
        (
            f"First event, upstream -> caller ms (max, {plan['gap_ms']:g} ms gaps)",
            lambda r: fmt(dig(r, "events", "first_event_ms", "max"), 3),
            False,
            fmt(dig(direct, "events", "first_event_ms", "max"), 3),
            "first_event_ms_max",
        ),
        (
            "Every event, upstream -> caller ms (p50 / p99 / max)",
            lambda r: triple(r, "events"),
            False,
            triple(direct, "events"),
            "any_event_ms_p99",
        ),
        *(
            [
                (
                    f"  same, events {plan['fast_gap_ms']:g} ms apart",
                    lambda r: triple(r, "events_fast"),
                    False,
                    triple(direct, "events_fast"),
                    "any_event_ms_p99_fast_tokens",
                )
            ]
            if plan["fast_gap_ms"]
            else []
        ),
        (
            f"  same, {plan['pad'] // 1024} KiB content events",
            lambda r: triple(r, "events_large"),
            False,
            triple(direct, "events_large"),
            "any_large_event_ms_p99",
        ),
        (
            f"Upstream conns opened, {plan['sequential']:,} sequential requests",
            lambda r: fmt(dig(r, "sequential", "upstream_connections_opened")),
            False,
            "",
            None,
        ),
        (
            "  per 10,000 requests",
            lambda r: fmt(dig(r, "sequential", "upstream_connections_per_10k"), 1),
            False,
            "",
            "upstream_connections_per_10k_sequential",
        ),
        (
            "Upstream conns per 10,000 requests, 50 conns",
            lambda r: fmt(dig(r, "nonstream_c50", "upstream_connections_per_10k"), 1),
            True,
            "",
            None,
        ),
        (
            f"RSS MB, {held:,} open streams (before)",
            lambda r: (
                f"{fmt(dig(r, 'held_streams', 'rss_mb'), 0)} ({fmt(dig(r, 'held_streams', 'rss_before_mb'), 0)})"
            ),
            False,
            "",
            f"rss_mb_{held}_open_streams",
        ),
        (
            f"Streams opened / dropped, of {held:,}",
            lambda r: (
                f"{fmt(dig(r, 'held_streams', 'opened'))} / {fmt(dig(r, 'held_streams', 'dropped'))}"
            ),
            False,
            "",
            f"streams_dropped_of_{held}",
        ),
        (
            f"Server CPU % with {held:,} idle open streams",
            lambda r: fmt(dig(r, "held_streams", "idle_cpu_percent"), 1),
            False,
            "",
            None,
        ),
        (
            "Non-stream req/s, 1 vs 2 processes (unpinned)",
            lambda r: (
                (
                    f"{fmt(dig(r, 'two_processes', 'one_process', 'rps'))} vs "
                    f"{fmt(dig(r, 'two_processes', 'two_processes', 'rps'))}"
                )
                if dig(r, "two_processes", "one_process")
                else "skipped"
            ),
            False,
            "",
            None,
        ),
    ]
    header = ["Metric", *routes, "reference", "direct", "target", "met"]
    lines = []
    for label, value_of, on_reference, direct_value, target_name in rows:
        values = [value_of(results["routes"][route]) for route in routes]
        reference_value = value_of(reference) if on_reference else ""
        target_text, met_text = "", ""
        if target_name:
            found = [targets.get((route, target_name)) for route in routes]
            first = next((t for t in found if t), None)
            if first:
                target_text = f"{'≤' if first['op'] == '<=' else '≥'} {fmt(first['target'])}"
                met_text = " / ".join(
                    "-" if not t or t["met"] is None else ("yes" if t["met"] else "NO")
                    for t in found
                )
        lines.append([label, *values, reference_value, direct_value, target_text, met_text])
    widths = [max(len(str(row[i])) for row in [header, *lines]) for i in range(len(header))]
    out = []
    for index, row in enumerate([header, *lines]):
        out.append(
            "  ".join(
                str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths))
            )
        )
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    return "\n".join(out)


def print_profile(results: dict) -> None:
    for name, summary in results.get("profile", {}).items():
        if not summary.get("samples"):
            continue
        print(f"\nprofile {name}: {summary['samples']} samples")
        print(
            "  own time by module:   "
            + ", ".join(
                f"{entry['function']} {entry['percent']:.0f}%" for entry in summary["modules"][:10]
            )
        )
        print("  own time by function:")
        for entry in summary["self"][:10]:
            print(f"    {entry['percent']:5.1f}%  {entry['function']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the smoke: a few seconds, every figure, no 2-process run",
    )
    parser.add_argument(
        "--json", default=str(BENCH / "results" / "latest.json"), help="where the JSON goes"
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="auto: wrk if installed (the full run installs it when it can)",
    )
    parser.add_argument(
        "--routes",
        default="gpt_chat,openai",
        help=f"comma-separated, of {', '.join(ROUTES)} (default gpt_chat,openai)",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="SECONDS",
        help="on a shared machine: wait up to this long for idle CPUs before starting",
    )
    parser.add_argument(
        "--keep-logs",
        action="store_true",
        help="keep the server and stand-in logs (kept anyway when the run had errors)",
    )
    parser.add_argument(
        "--open",
        action="store_true",
        help="run the server without caller keys (default: API_KEYS set, every request keyed)",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin the server to CPU 0")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="sample the server with py-spy during the 50-connection runs",
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for server.py (repeatable)",
    )
    parser.add_argument(
        "--server-script",
        default="server.py",
        metavar="SCRIPT",
        help="what the venv's python runs as the server (default server.py): to try a change",
    )
    parser.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra header on every request to the server (repeatable)",
    )
    args = parser.parse_args()
    for name in args.routes.split(","):
        if name not in ROUTES:
            parser.error(f"unknown route {name!r}")
    plan = QUICK if args.quick else FULL
    # SIGTERM unwinds like Ctrl-C, so the run's finally stops every process it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    wrk = ensure_wrk(plan.quick, args.loadgen)
    if wrk is None and not plan.quick and args.loadgen != "python":
        return 2
    print(
        f"azure-gpt-api benchmark ({'quick' if plan.quick else 'full'} run, "
        f"load from {'wrk' if wrk else 'the Python client'})",
        flush=True,
    )
    results = run(plan, args)
    meta = results["meta"]
    print()
    print(
        f"{meta['date']}  {meta['nproc']} CPUs ({meta['cpu_model']})  python {meta['python']}  "
        f"load: {meta['load_generator']}{' ' + meta['wrk_version'] if meta['wrk_version'] else ''}  "
        f"pinning: {meta['pinning']}  git {meta['git']}"
    )
    print(table(results))
    print_profile(results)
    met = [t for t in results["targets"] if t["met"] is True]
    missed = [t for t in results["targets"] if t["met"] is False]
    print(
        f"\ntargets: {len(met)} met, {len(missed)} missed"
        + (
            ": " + ", ".join(f"{t['metric']} ({t['route']}: {fmt(t['value'], 3)})" for t in missed)
            if missed
            else ""
        )
    )
    json_path = Path(args.json)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"results: {json_path}" + (f"  (logs: {meta['logs']})" if meta["logs"] else ""))
    if results["errors"]:
        print(f"\n{len(results['errors'])} error(s):", file=sys.stderr)
        for error in results["errors"]:
            print(f"  {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
