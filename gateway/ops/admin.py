"""The admin JSON documents the web console reads, built from plain inputs.

Routes (all `GET`, JSON, `Cache-Control: no-store`). They need an admin key,
in `Authorization: Bearer <key>` or `api-key: <key>`, as `/v1/usage` does; on
an open gateway (no keys configured) anyone may read them. Errors use the
OpenAI shape `{"error": {"code", "message", "type", "param"}}`: 401
`invalid_admin_key` (no key, or one the gateway does not know), 403
`admin_required` (a caller key that is not an admin key), 503
`quota_unavailable` (the usage store cannot be read). The console shows
`error.message`.

`GET /v1/admin/deployments` (`deployments_document`)::

    {"time": "2026-01-01T12:00:00.000Z",
     "deployments": [
       {"name": "westeurope", "deployment": "gpt-4o", "host": "we.openai.azure.com",
        "models": ["gpt-4o"], "weight": 1.0, "priority": null,
        "state": "ready" | "cooling_down",
        "cooling_down_until": "2026-01-01T12:00:12.000Z" | null,
        "cooling_down_seconds": 12.0 | 0,
        "in_flight": 2,
        "azure_remaining_requests": 99 | null, "azure_remaining_tokens": 9000 | null,
        "recent": {"requests": 20, "errors": 2, "error_rate": 0.1 | null,
                   "window_seconds": 300}}]}

`azure_remaining_*` are the `x-ratelimit-remaining-*` headers of Azure's last
answer from that deployment (null before any, or when Azure sent -1).
`recent` counts upstream attempts and the failures that cool a deployment down
(`RecentAttempts`). `priority`, `in_flight` and the remaining counts come from
the pool's capacity board (gateway/policy/capacity.py); a reading older than its
`stale_after` shows as null.

`GET /v1/admin/usage` (`usage_document`)::

    {"time": "...",
     "scope": "process" | "shared",
     "rows": [{"key": "alice", "deployment": "westeurope", "requests": 3,
               "prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
               "cost": null}],
     "totals": {"requests": 3, "prompt_tokens": 30, "completion_tokens": 12,
                "total_tokens": 42, "cost": null},
     "quotas": [{"key": "alice", "rpm": 60, "tpm": 10000,
                 "remaining_requests": 57, "remaining_tokens": 9958,
                 "resets_in_seconds": 41}]}

`scope` is "process" when usage is counted in memory (each process reports
its own) and "shared" when counted in Redis. `cost` is in US dollars at the
deployments' `price` (0 without one). A quota's `rpm`/`tpm`/`remaining_*` are null where the key has no
such limit.

`GET /v1/admin/requests?limit=N` (`requests_document`, N from 1 to the
buffer's capacity, default 50)::

    {"time": "...", "capacity": 200,
     "requests": [{"time": "...", "request_id": "...", "method": "POST",
                   "route": "chat_completions", "path": "/v1/chat/completions",
                   "status": 200, "key": "alice", "deployment": "westeurope",
                   "upstream_status": 200, "attempts": 1, "duration_ms": 812.4,
                   "ttft_ms": 230.1, "prompt_tokens": 30, "completion_tokens": 12,
                   "apim_request_id": "..."}]}

Newest first, only the access log's fields (`gateway.accesslog.FIELDS`, never
a prompt or a key), a field absent when the access log has no value for it.

The playground posts to the ordinary API routes with the caller's key and
reads the `x-request-id`, `x-upstream-attempts` and `x-upstream-deployment`
response headers.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

from gateway.ops.accesslog import FIELDS, timestamp
from gateway.policy.capacity import REMAINING_REQUESTS, REMAINING_TOKENS
from gateway.policy.failover import DeploymentPool

DEFAULT_RECENT_CAPACITY = 200
DEFAULT_REQUESTS_LIMIT = 50
RECENT_WINDOW_SECONDS = 300
# The window moves in steps of RECENT_WINDOW_SECONDS / RECENT_BUCKETS.
RECENT_BUCKETS = 30


@dataclass(frozen=True)
class DeploymentState:
    """One deployment as the pool sees it now."""

    name: str
    deployment: str
    endpoint: str
    models: tuple[str, ...] = ()
    weight: float = 1.0
    priority: int | None = None
    cooling_for: float = 0.0
    in_flight: int | None = None
    azure_remaining_requests: int | None = None
    azure_remaining_tokens: int | None = None
    recent_requests: int = 0
    recent_errors: int = 0


def pool_states(pool: DeploymentPool, attempts: RecentAttempts) -> list[DeploymentState]:
    """Each deployment of `pool` as it stands now, with its recent attempts."""
    states = []
    for deployment in pool.deployments:
        made, failed = attempts.counts(deployment.name)
        states.append(
            DeploymentState(
                name=deployment.name,
                deployment=deployment.deployment,
                endpoint=deployment.endpoint,
                models=deployment.models,
                weight=deployment.weight,
                priority=deployment.priority,
                cooling_for=pool.cooling_for(deployment),
                in_flight=pool.board.in_flight_count(deployment.name),
                azure_remaining_requests=pool.board.remaining(deployment.name, REMAINING_REQUESTS),
                azure_remaining_tokens=pool.board.remaining(deployment.name, REMAINING_TOKENS),
                recent_requests=made,
                recent_errors=failed,
            )
        )
    return states


@dataclass(frozen=True)
class KeyQuota:
    """A caller key's limits and what it used in the current window."""

    key: str
    rpm: int | None
    tpm: int | None
    requests_used: int = 0
    tokens_used: int = 0
    resets_in_seconds: int = 0


def _remaining(value: int | None) -> int | None:
    """Azure sends -1 when it does not say (seen on the Responses API)."""
    return value if value is not None and value >= 0 else None


def deployments_document(
    states: Iterable[DeploymentState],
    *,
    now: float | None = None,
    window_seconds: int = RECENT_WINDOW_SECONDS,
) -> dict[str, Any]:
    """`GET /v1/admin/deployments`; `window_seconds` is how far back `recent_*` counted."""
    now = time.time() if now is None else now
    deployments = []
    for state in states:
        cooling = state.cooling_for > 0
        deployments.append(
            {
                "name": state.name,
                "deployment": state.deployment,
                "host": urlsplit(state.endpoint).hostname,
                "models": list(state.models),
                "weight": state.weight,
                "priority": state.priority,
                "state": "cooling_down" if cooling else "ready",
                "cooling_down_until": timestamp(now + state.cooling_for) if cooling else None,
                "cooling_down_seconds": round(state.cooling_for, 1) if cooling else 0,
                "in_flight": state.in_flight,
                "azure_remaining_requests": _remaining(state.azure_remaining_requests),
                "azure_remaining_tokens": _remaining(state.azure_remaining_tokens),
                "recent": {
                    "requests": state.recent_requests,
                    "errors": state.recent_errors,
                    "error_rate": (
                        round(state.recent_errors / state.recent_requests, 4)
                        if state.recent_requests
                        else None
                    ),
                    "window_seconds": window_seconds,
                },
            }
        )
    return {"time": timestamp(now), "deployments": deployments}


def usage_document(
    report: Mapping[str, Any],
    *,
    scope: Literal["process", "shared"],
    quotas: Iterable[KeyQuota] = (),
    now: float | None = None,
) -> dict[str, Any]:
    """`GET /v1/admin/usage` from a QuotaStore's `usage_report()` and the keys' quotas.

    `cost` is the report's `cost_usd` (US dollars at the deployments' prices).
    """
    rows = []
    for key, deployments in report.get("keys", {}).items():
        for deployment, counters in deployments.items():
            prompt = int(counters.get("prompt_tokens", 0))
            completion = int(counters.get("completion_tokens", 0))
            rows.append(
                {
                    "key": key,
                    "deployment": deployment,
                    "requests": int(counters.get("requests", 0)),
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                    "cost": float(counters["cost_usd"]) if "cost_usd" in counters else None,
                }
            )
    totals: dict[str, Any] = {
        name: sum(row[name] for row in rows)
        for name in ("requests", "prompt_tokens", "completion_tokens", "total_tokens")
    }
    costs = [row["cost"] for row in rows if row["cost"] is not None]
    totals["cost"] = sum(costs) if costs else None
    return {
        "time": timestamp(time.time() if now is None else now),
        "scope": scope,
        "rows": rows,
        "totals": totals,
        "quotas": [
            {
                "key": quota.key,
                "rpm": quota.rpm,
                "tpm": quota.tpm,
                "remaining_requests": (
                    max(0, quota.rpm - quota.requests_used) if quota.rpm is not None else None
                ),
                "remaining_tokens": (
                    max(0, quota.tpm - quota.tokens_used) if quota.tpm is not None else None
                ),
                "resets_in_seconds": quota.resets_in_seconds,
            }
            for quota in quotas
        ],
    }


class RecentRequests:
    """The last `capacity` access records, for the console; older ones fall out.

    Keeps only the access log's fields, so nothing the log would not show
    (no prompt, no key) can reach the page. Safe to add to from any thread.
    """

    def __init__(self, capacity: int = DEFAULT_RECENT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {capacity}")
        self.capacity = capacity
        self._records: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def add(self, record: Mapping[str, Any]) -> None:
        kept = {name: value for name in FIELDS if (value := record.get(name)) is not None}
        with self._lock:
            self._records.append(kept)

    def newest(self, limit: int | None = None) -> list[dict[str, Any]]:
        """Up to `limit` records (all by default), newest first."""
        with self._lock:
            records = list(self._records)
        records.reverse()
        return records if limit is None else records[:limit]

    def __len__(self) -> int:
        return len(self._records)


class RecentAttempts:
    """Each deployment's upstream attempts, and those that failed it, over the last
    `window_seconds`: the deployments view's recent error rate.

    A failure here is one that cools the deployment down (a retryable one: 429,
    5xx, a timeout, a refused connection); a 400 is the caller's, not the
    deployment's. Counted in buckets, so memory stays `buckets` entries per
    deployment however busy it is.
    """

    def __init__(
        self,
        window_seconds: int = RECENT_WINDOW_SECONDS,
        *,
        buckets: int = RECENT_BUCKETS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_seconds = window_seconds
        self._buckets = buckets
        self._width = window_seconds / buckets
        self._clock = clock
        # deployment -> [bucket number, attempts, failures], oldest first
        self._counts: dict[str, deque[list[int]]] = {}

    def count(self, deployment: str, *, failed: bool) -> None:
        bucket = int(self._clock() // self._width)
        counts = self._counts.get(deployment)
        if counts is None:
            counts = self._counts[deployment] = deque()
        if counts and counts[-1][0] == bucket:
            counts[-1][1] += 1
            counts[-1][2] += failed
        else:
            counts.append([bucket, 1, int(failed)])
            while counts[0][0] <= bucket - self._buckets:
                counts.popleft()

    def counts(self, deployment: str) -> tuple[int, int]:
        """(attempts, failures) of `deployment` within the window."""
        oldest = int(self._clock() // self._width) - self._buckets
        attempts = failures = 0
        for bucket, made, failed in self._counts.get(deployment, ()):
            if bucket > oldest:
                attempts += made
                failures += failed
        return attempts, failures


def requests_limit(raw: str | None, capacity: int) -> int:
    """The `limit` query argument as a number, or ValueError naming the rule."""
    if raw is None or raw == "":
        return min(DEFAULT_REQUESTS_LIMIT, capacity)
    if not raw.isdigit() or not 1 <= int(raw) <= capacity:
        raise ValueError(f"limit must be a whole number from 1 to {capacity}")
    return int(raw)


def requests_document(
    recent: RecentRequests, *, limit: int, now: float | None = None
) -> dict[str, Any]:
    """`GET /v1/admin/requests`."""
    return {
        "time": timestamp(time.time() if now is None else now),
        "capacity": recent.capacity,
        "requests": recent.newest(limit),
    }
