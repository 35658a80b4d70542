"""Prometheus metrics of the gateway, and their exposition.

`Metrics(registry)` creates every series on the registry it is given, so
tests (and several apps in one process) each build their own.

Several processes (PM2 `instances`)
-----------------------------------
Each PM2 instance counts on its own, and a scrape reaches only one of them.
prometheus-client's multiprocess mode makes every instance write its values
to files in a shared directory, and `render()` then sums the files of all
of them. To enable it:

1. Set `PROMETHEUS_MULTIPROC_DIR` to a writable directory in the
   environment every instance starts with (the `env` of ecosystem.config.js,
   not `.env`): prometheus-client reads it once, when it is first imported,
   so it must be set before the process starts.
2. Empty that directory once, before the instances start and not by an
   instance itself (each would delete the others' files): call
   `prepare_multiprocess_dir(path)` from the start script, just before
   `pm2 start ecosystem.config.js`, e.g.
   `python -m gateway.ops.metrics prepare "$PROMETHEUS_MULTIPROC_DIR"`.
   Not before `pm2 reload`: the running instances' counts would be lost.
3. Optionally, at each instance's start, call `forget_dead_processes(path)`
   so the in-flight gauge of an instance that crashed stops counting.

Files of finished processes stay: their counters keep adding to the totals
(which is what a counter means) until the directory is emptied again.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from collections.abc import Hashable
from typing import Generic, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.registry import Collector

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# From a fast non-streamed answer or a refusal (tens of ms) to a long
# completion (REQUEST_TIMEOUT is 10 minutes by default).
REQUEST_DURATION_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0,
    20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0,
)  # fmt: skip
# The first token usually comes within a second or two; a busy deployment
# or a long prompt can take tens of seconds.
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
    15.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip

_PROCESS_FILE = re.compile(r"_(\d+)\.db$")

MetricT = TypeVar("MetricT", Counter, Gauge, Histogram)


class LabelledChildren(Generic[MetricT]):
    """`metric.labels(*values)`, made once per distinct label values.

    prometheus-client's `labels()` turns every value into a string, takes a
    lock and looks the child up on each call. The child it returns lives as
    long as the metric (the gateway never removes a series), in multiprocess
    mode too: its value writes to this process's file, and prometheus-client
    switches files itself if the process id changes. So each child is kept
    here, keyed by the values as given, and a label set seen before costs one
    dict lookup. There are only as many entries as the metric has series.
    """

    def __init__(self, metric: MetricT) -> None:
        self.metric: MetricT = metric
        self._children: dict[tuple[Hashable, ...], MetricT] = {}

    def __call__(self, *values: Hashable) -> MetricT:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self.metric.labels(*values)
        return child


class Metrics:
    """Every series the gateway exposes, created on `registry`.

    Label values: `route` is the route pattern (not the raw path, which
    would grow without bound), `key` a caller key's name ("anonymous" when
    the gateway is open), never the key itself.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Read once: prometheus-client decided at import whether to write files.
        self.multiprocess_dir = os.environ.get(MULTIPROC_DIR_VARIABLE) or None
        self.requests_total = Counter(
            "gateway_requests_total",
            "Requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=registry,
        )
        self.request_duration_seconds = Histogram(
            "gateway_request_duration_seconds",
            "Time from receiving a request to finishing its answer.",
            ["route"],
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self.time_to_first_token_seconds = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from receiving a streamed request to relaying its first event.",
            ["route"],
            buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
            registry=registry,
        )
        self.upstream_attempts_total = Counter(
            "gateway_upstream_attempts_total",
            "Calls to Azure OpenAI deployments, by outcome.",
            ["deployment", "outcome"],
            registry=registry,
        )
        self.tokens_total = Counter(
            "gateway_tokens_total",
            "Tokens Azure reported, by caller key, deployment and kind (prompt, completion).",
            ["key", "deployment", "kind"],
            registry=registry,
        )
        self.streams_in_flight = Gauge(
            "gateway_streams_in_flight",
            "Streamed answers being relayed now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.quota_rejections_total = Counter(
            "gateway_quota_rejections_total",
            "Requests refused by a caller key's limit (requests or tokens per minute, budget).",
            ["key", "limit"],
            registry=registry,
        )
        self.cost_usd_total = Counter(
            "gateway_cost_usd_total",
            "US dollars of Azure usage at the deployments' prices, by caller key and deployment.",
            ["key", "deployment"],
            registry=registry,
        )
        self.spills_total = Counter(
            "gateway_spills_total",
            "Requests sent past the first priority group, by the deployment that took them.",
            ["deployment", "priority"],
            registry=registry,
        )
        self.redis_errors_total = Counter(
            "gateway_redis_errors_total",
            "Failed calls to Redis (the quota store and the response affinity store).",
            registry=registry,
        )
        self.entra_tokens_total = Counter(
            "gateway_entra_tokens_total",
            "Entra ID token acquisitions for Azure OpenAI, by credential and outcome "
            "(acquired, failed).",
            ["credential", "outcome"],
            registry=registry,
        )
        self.jwt_rejections_total = Counter(
            "gateway_jwt_rejections_total",
            "Callers' bearer tokens refused, by reason (gateway/policy/oidc.py REASONS).",
            ["reason"],
            registry=registry,
        )
        self.trace_spans_dropped_total = Counter(
            "gateway_trace_spans_dropped_total",
            "Trace spans lost: the export queue was full or the collector did not take them.",
            registry=registry,
        )

        self._requests = LabelledChildren(self.requests_total)
        self._durations = LabelledChildren(self.request_duration_seconds)
        self._first_tokens = LabelledChildren(self.time_to_first_token_seconds)
        self._attempts = LabelledChildren(self.upstream_attempts_total)
        self._tokens = LabelledChildren(self.tokens_total)
        self._quota_rejections = LabelledChildren(self.quota_rejections_total)
        self._costs = LabelledChildren(self.cost_usd_total)
        self._spills = LabelledChildren(self.spills_total)
        # Collectors that read live state at each scrape (see `add_collector`).
        self._collectors: list[Collector] = []

    def count_request(
        self, route: str, status: int, duration: float, time_to_first_token: float | None = None
    ) -> None:
        """Count one answered request, its duration and (streams) its time to first token, in seconds."""
        self._requests(route, status).inc()
        self._durations(route).observe(duration)
        if time_to_first_token is not None:
            self._first_tokens(route).observe(time_to_first_token)

    def count_attempt(self, deployment: str, outcome: str) -> None:
        """Count one call to a deployment: "ok", or the failure's code."""
        self._attempts(deployment, outcome).inc()

    def count_tokens(self, key: str, deployment: str, prompt: int, completion: int) -> None:
        """Add one answer's usage to gateway_tokens_total."""
        self._tokens(key, deployment, "prompt").inc(prompt)
        self._tokens(key, deployment, "completion").inc(completion)

    def count_quota_rejection(self, key: str, limit: str) -> None:
        """Count a request refused by `key`'s limit ("requests", "tokens" or "budget")."""
        self._quota_rejections(key, limit).inc()

    def count_cost(self, key: str, deployment: str, usd: float) -> None:
        """Add one answer's cost to gateway_cost_usd_total."""
        self._costs(key, deployment).inc(usd)

    def count_spill(self, deployment: str, priority: int) -> None:
        """Count a request sent to `deployment`, past the first priority group."""
        self._spills(deployment, priority).inc()

    def add_collector(self, collector: Collector) -> None:
        """Expose `collector` too: this process's values, in multiprocess mode as well."""
        self._collectors.append(collector)
        self.registry.register(collector)

    def count_token_acquired(self, credential: str) -> None:
        self.entra_tokens_total.labels(credential, "acquired").inc()

    def count_token_failed(self, credential: str) -> None:
        self.entra_tokens_total.labels(credential, "failed").inc()

    def count_jwt_rejection(self, reason: str) -> None:
        self.jwt_rejections_total.labels(reason).inc()

    def count_dropped_spans(self, count: int) -> None:
        """Count spans the tracer lost (called from the exporter's thread too)."""
        self.trace_spans_dropped_total.inc(count)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its Content-Type.

        In multiprocess mode, the sum over every process's files, read
        through a fresh registry (the files are the only shared state).
        """
        if self.multiprocess_dir is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        for collector in self._collectors:
            registry.register(collector)
        return generate_latest(registry), CONTENT_TYPE_LATEST


def prepare_multiprocess_dir(path: str) -> None:
    """Create `path` if needed and delete the value files left by earlier runs.

    Call once per start of the whole set of instances, before any starts
    (see the module docstring); never from a running instance.
    """
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)


def forget_dead_processes(path: str) -> list[int]:
    """Drop the live gauges of processes that no longer run; return their pids.

    Safe to call from any instance at start: live processes keep their files.
    """
    pids = {
        int(match.group(1))
        for name in glob.glob(os.path.join(path, "gauge_live*_*.db"))
        if (match := _PROCESS_FILE.search(name))
    }
    dead = [pid for pid in sorted(pids) if not _process_exists(pid)]
    for pid in dead:
        multiprocess.mark_process_dead(pid, path)
    return dead


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: list[str]) -> int:
    """`python -m gateway.ops.metrics prepare DIR`: empty DIR before the instances start."""
    if len(argv) != 2 or argv[0] != "prepare" or not argv[1]:
        print("usage: python -m gateway.ops.metrics prepare DIR", file=sys.stderr)
        return 2
    prepare_multiprocess_dir(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
