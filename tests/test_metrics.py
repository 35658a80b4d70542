"""Metrics: the series, their exposition, and several processes summed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.ops.metrics import (
    MULTIPROC_DIR_VARIABLE,
    Metrics,
    forget_dead_processes,
    main,
    prepare_multiprocess_dir,
)

from .support.metrics import samples, series

ROOT = Path(__file__).resolve().parent.parent
ROUTE = "/v1/chat/completions"
ALICE = {"deployment": "gpt-4o", "key": "alice"}


@pytest.fixture
def single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MULTIPROC_DIR_VARIABLE, raising=False)


def test_render_has_every_series_after_known_increments(single_process):
    metrics = Metrics(CollectorRegistry())
    metrics.requests_total.labels(ROUTE, "200").inc(3)
    metrics.requests_total.labels(ROUTE, "429").inc()
    metrics.request_duration_seconds.labels(ROUTE).observe(0.2)
    metrics.request_duration_seconds.labels(ROUTE).observe(42.0)
    metrics.time_to_first_token_seconds.labels(ROUTE).observe(0.7)
    metrics.upstream_attempts_total.labels("gpt-4o", "ok").inc(2)
    metrics.upstream_attempts_total.labels("gpt-4o", "timeout").inc()
    metrics.count_tokens("alice", "gpt-4o", 120, 30)
    metrics.streams_in_flight.inc(2)
    metrics.streams_in_flight.dec()
    metrics.quota_rejections_total.labels("alice", "requests").inc()
    metrics.redis_errors_total.inc(4)

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    found = samples(body)
    assert found[series("gateway_requests_total", route=ROUTE, status="200")] == 3
    assert found[series("gateway_requests_total", route=ROUTE, status="429")] == 1
    assert found[series("gateway_request_duration_seconds_count", route=ROUTE)] == 2
    assert found[series("gateway_request_duration_seconds_sum", route=ROUTE)] == 42.2
    assert found[series("gateway_request_duration_seconds_bucket", le="0.25", route=ROUTE)] == 1
    assert found[series("gateway_request_duration_seconds_bucket", le="45.0", route=ROUTE)] == 2
    first_token = "gateway_time_to_first_token_seconds_bucket"
    assert found[series(first_token, le="0.75", route=ROUTE)] == 1
    assert found[series(first_token, le="0.5", route=ROUTE)] == 0
    assert found[series("gateway_upstream_attempts_total", deployment="gpt-4o", outcome="ok")] == 2
    assert found[series("gateway_tokens_total", **ALICE, kind="prompt")] == 120
    assert found[series("gateway_tokens_total", **ALICE, kind="completion")] == 30
    assert found[series("gateway_streams_in_flight")] == 1
    assert found[series("gateway_quota_rejections_total", key="alice", limit="requests")] == 1
    assert found[series("gateway_redis_errors_total")] == 4


def test_count_methods_add_to_one_series_per_label_set(single_process):
    metrics = Metrics(CollectorRegistry())
    for _ in range(3):
        metrics.count_request(ROUTE, 200, 0.2)
    metrics.count_request(ROUTE, 429, 0.01)
    metrics.count_request(ROUTE, 200, 1.5, time_to_first_token=0.7)
    metrics.count_attempt("gpt-4o", "ok")
    metrics.count_attempt("gpt-4o", "ok")
    metrics.count_attempt("gpt-4o", "upstream_timeout")
    metrics.count_tokens("alice", "gpt-4o", 1, 2)
    metrics.count_tokens("alice", "gpt-4o", 10, 20)
    metrics.count_quota_rejection("alice", "tokens")
    metrics.count_quota_rejection("alice", "tokens")

    found = samples(metrics.render()[0])
    assert found[series("gateway_requests_total", route=ROUTE, status="200")] == 4
    assert found[series("gateway_requests_total", route=ROUTE, status="429")] == 1
    assert found[series("gateway_request_duration_seconds_count", route=ROUTE)] == 5
    assert found[series("gateway_request_duration_seconds_sum", route=ROUTE)] == pytest.approx(2.11)
    assert found[series("gateway_time_to_first_token_seconds_count", route=ROUTE)] == 1
    assert found[series("gateway_upstream_attempts_total", deployment="gpt-4o", outcome="ok")] == 2
    timeout = series(
        "gateway_upstream_attempts_total", deployment="gpt-4o", outcome="upstream_timeout"
    )
    assert found[timeout] == 1
    assert found[series("gateway_tokens_total", **ALICE, kind="prompt")] == 11
    assert found[series("gateway_tokens_total", **ALICE, kind="completion")] == 22
    assert found[series("gateway_quota_rejections_total", key="alice", limit="tokens")] == 2


def test_buckets_reach_from_milliseconds_to_minutes(single_process):
    body, _ = Metrics(CollectorRegistry()).render()
    assert b"# TYPE gateway_request_duration_seconds histogram" in body
    metrics = Metrics(CollectorRegistry())
    metrics.request_duration_seconds.labels(ROUTE).observe(0.001)
    found = samples(metrics.render()[0])
    bounds = sorted(
        float(dict(labels)["le"])
        for name, labels in found
        if name == "gateway_request_duration_seconds_bucket"
    )
    assert bounds[0] <= 0.01 and bounds[-2] >= 600


def test_each_registry_gets_its_own_series(single_process):
    first, second = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    first.redis_errors_total.inc()
    assert samples(first.render()[0])[series("gateway_redis_errors_total")] == 1
    assert samples(second.render()[0])[series("gateway_redis_errors_total")] == 0


# One "PM2 instance": counts with PROMETHEUS_MULTIPROC_DIR set, then exits.
INSTANCE = """
import sys
from prometheus_client import CollectorRegistry
from gateway.ops.metrics import Metrics

n = int(sys.argv[1])
metrics = Metrics(CollectorRegistry())
for _ in range(n):  # the same series each time, as the gateway counts
    metrics.count_request("/v1/chat/completions", 200, 0.3)
    metrics.count_tokens("alice", "gpt-4o", 10, 1)
metrics.streams_in_flight.inc()
metrics.redis_errors_total.inc()
"""


def run_instance(directory: Path, count: int) -> None:
    env = {**os.environ, MULTIPROC_DIR_VARIABLE: str(directory), "PYTHONPATH": str(ROOT)}
    subprocess.run(
        [sys.executable, "-c", INSTANCE, str(count)], cwd=ROOT, env=env, check=True, timeout=60
    )


def test_multiprocess_mode_sums_every_process(tmp_path, monkeypatch):
    directory = tmp_path / "prometheus"
    prepare_multiprocess_dir(str(directory))
    run_instance(directory, 3)
    run_instance(directory, 4)

    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(directory))
    metrics = Metrics(CollectorRegistry())
    # This process's own (in-memory) values are not what a scrape reads.
    metrics.requests_total.labels(ROUTE, "200").inc(1000)
    found = samples(metrics.render()[0])
    assert found[series("gateway_requests_total", route=ROUTE, status="200")] == 7
    assert found[series("gateway_request_duration_seconds_count", route=ROUTE)] == 7
    assert found[series("gateway_tokens_total", **ALICE, kind="prompt")] == 70
    assert found[series("gateway_redis_errors_total")] == 2
    assert found[series("gateway_streams_in_flight")] == 2

    # Both instances have exited: their in-flight streams stop counting,
    # their counters stay in the totals.
    assert len(forget_dead_processes(str(directory))) == 2
    found = samples(metrics.render()[0])
    assert found.get(series("gateway_streams_in_flight"), 0) == 0
    assert found[series("gateway_requests_total", route=ROUTE, status="200")] == 7


def test_forget_dead_processes_keeps_live_ones(tmp_path):
    (tmp_path / f"gauge_livesum_{os.getpid()}.db").write_bytes(b"")
    assert forget_dead_processes(str(tmp_path)) == []
    assert (tmp_path / f"gauge_livesum_{os.getpid()}.db").exists()


def test_prepare_multiprocess_dir_creates_and_empties(tmp_path):
    directory = tmp_path / "new" / "prometheus"
    prepare_multiprocess_dir(str(directory))
    assert directory.is_dir()
    (directory / "counter_123.db").write_bytes(b"stale")
    (directory / "gauge_livesum_123.db").write_bytes(b"stale")
    (directory / "README").write_text("not ours")
    assert main(["prepare", str(directory)]) == 0
    assert sorted(path.name for path in directory.iterdir()) == ["README"]
    assert main([]) == 2
