"""Per-key admission (rate limits and budgets) and the usage report, in memory or in Redis.

Admission, before Azure is called, for a request's token estimate
(gateway/policy/estimate.py): the key's budgets first (gateway/policy/budgets.py;
used up, a 429 naming the reset time), then its `rpm` and `tpm` over a
sliding 60-second window (gateway/policy/limits.py), which charges the
request's estimate. A refused request is charged nothing.

After the answer, `record_usage` settles the request with what Azure
counted: the window's charge is corrected to the real tokens, the budgets
get the tokens and the cost, and the usage report gets all of it.

Two stores share one interface (`QuotaStore`):

- `MemoryQuota` counts in this process only: with several PM2 instances each
  enforces the limits alone, so a key may get up to N times its limits, and
  each reports only its own usage.
- `RedisQuota` counts in Redis: the window's check and charge are one Lua
  script, so processes sharing Redis never admit more than the limit between
  them. When Redis cannot be reached it either admits without limits
  (`on_error="open"`) or refuses limited keys with a 503 (`"closed"`); each
  failure calls `on_redis_error` and at most one warning a minute is logged.
  Recording usage never fails a request: after Azure has answered there is
  nothing left to refuse.

Usage-report counters never expire: they run from when the store was empty
(for `MemoryQuota`, since the process started).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import GatewayError
from gateway.policy.budgets import BudgetStore, MemoryBudgets, RedisBudgets, TokenUsage
from gateway.policy.estimate import Estimate
from gateway.policy.keys import CallerKey
from gateway.policy.limits import (
    Charge,
    Decision,
    MemoryRateLimiter,
    RateLimiter,
    RedisRateLimiter,
)

log = logging.getLogger("azure-gpt-api.quota")

# Quota checks sit in front of every request: a Redis that does not answer
# within this long counts as down, rather than holding requests up.
REDIS_SOCKET_TIMEOUT = 0.5
REDIS_CONNECT_TIMEOUT = 0.5
# One more try on a fresh connection, so a Redis restart costs no request.
REDIS_RETRIES = 1
# Connections one process keeps to Redis; a burst beyond them waits for one
# to be free (up to REDIS_POOL_WAIT_TIMEOUT) instead of failing.
REDIS_MAX_CONNECTIONS = 50
REDIS_POOL_WAIT_TIMEOUT = 2.0
ERROR_LOG_INTERVAL = 60.0
DEFAULT_REDIS_PREFIX = "azgw:"
# The key name usage is recorded under when no keys are configured.
ANONYMOUS = "anonymous"

_REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
_USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens")
COST_FIELD = "cost_usd"


class WindowUsage(NamedTuple):
    """What a key used in the sliding window now, and when its oldest charge leaves it."""

    requests: int
    tokens: int
    resets_in_seconds: int


class QuotaStore(Protocol):
    async def admit(self, key: CallerKey, estimate: Estimate) -> Decision: ...

    async def record_usage(
        self,
        key_name: str,
        key: CallerKey | None,
        deployment: str,
        usage: TokenUsage,
        cost_usd: float,
        charge: Charge | None = None,
    ) -> None: ...

    async def usage_report(self) -> dict: ...

    async def window_usage(self, key: CallerKey) -> WindowUsage: ...

    async def close(self) -> None: ...


def has_limits(key: CallerKey) -> bool:
    return key.limits.limited or key.budget.limited


async def admit_with(
    limiter: RateLimiter, budgets: BudgetStore, key: CallerKey, estimate: Estimate
) -> Decision:
    """Budgets, then the window (which charges only a request it admits)."""
    if key.budget.limited:
        over = await budgets.check(key.budget)
        if over is not None:
            return Decision(refusal=over, limit="budget")
    return await limiter.admit(key.limits, estimate)


async def settle_with(
    limiter: RateLimiter,
    budgets: BudgetStore,
    key: CallerKey | None,
    tokens: int,
    cost_usd: float,
    charge: Charge | None,
) -> None:
    """The window's charge moves to the real figure; a budgeted key's spend grows."""
    if charge is not None:
        await limiter.correct(charge, tokens)
    if key is not None and key.budget.limited:
        await budgets.record(key.name, tokens, cost_usd)


def _sorted_report(usage: dict[str, dict[str, dict[str, float]]]) -> dict:
    return {
        "keys": {
            name: {deployment: dict(usage[name][deployment]) for deployment in sorted(usage[name])}
            for name in sorted(usage)
        }
    }


def _new_counters() -> dict[str, float]:
    return {**dict.fromkeys(_USAGE_FIELDS, 0), COST_FIELD: 0.0}


class MemoryQuota:
    """Limits, budgets and usage counted in this process; see the module docstring."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.limiter = MemoryRateLimiter(clock=clock)
        self.budgets = MemoryBudgets(clock=clock)
        self._usage: dict[str, dict[str, dict[str, float]]] = {}

    async def admit(self, key: CallerKey, estimate: Estimate) -> Decision:
        """Admit and charge a request of `key`, or refuse it without charging it."""
        if not has_limits(key):
            return Decision()
        return await admit_with(self.limiter, self.budgets, key, estimate)

    async def record_usage(
        self,
        key_name: str,
        key: CallerKey | None,
        deployment: str,
        usage: TokenUsage,
        cost_usd: float,
        charge: Charge | None = None,
    ) -> None:
        """Settle one answered request: correct its charge, add it to budgets and the report."""
        await settle_with(self.limiter, self.budgets, key, usage.total, cost_usd, charge)
        counters = self._usage.setdefault(key_name, {}).setdefault(deployment, _new_counters())
        counters["requests"] += 1
        counters["prompt_tokens"] += usage.input_tokens
        counters["completion_tokens"] += usage.output_tokens
        counters[COST_FIELD] += cost_usd

    async def usage_report(self) -> dict:
        """`{"keys": {name: {deployment: {"requests", "prompt_tokens", "completion_tokens",
        "cost_usd"}}}}`."""
        return _sorted_report(self._usage)

    async def window_usage(self, key: CallerKey) -> WindowUsage:
        """`key`'s requests and tokens in the current window (counted only for limited keys)."""
        used = await self.limiter.usage(key.name)
        return WindowUsage(used.requests, used.tokens, used.frees_in_seconds)

    async def close(self) -> None:
        """Nothing to release; here so both stores close the same way."""


def redacted_redis_url(url: str) -> str:
    """`url` without user, password or query (which may carry one): safe to log."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _url_passwords(url: str) -> list[str]:
    parts = urlsplit(url)
    found = [parts.password] if parts.password else []
    found += [value for value in parse_qs(parts.query).get("password", []) if value]
    return found


class RedisQuota:
    """Limits, budgets and usage counted in Redis, shared by every process using the same server.

    Keys are prefixed with `prefix`: the windows' `azgw:window:...` and the
    budgets' `azgw:budget:...` (expiring), `azgw:usage:["<key>","<deployment>"]`
    hashes and the `azgw:usage-index` set listing them.
    """

    def __init__(
        self,
        url: str,
        on_error: Literal["open", "closed"],
        *,
        on_redis_error: Callable[[], None] | None = None,
        prefix: str = DEFAULT_REDIS_PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if on_error not in ("open", "closed"):
            raise ValueError(f"on_error must be 'open' or 'closed', not {on_error!r}")
        self.on_error = on_error
        self.prefix = prefix
        self.safe_url = redacted_redis_url(url)
        self._passwords = _url_passwords(url)
        self._on_redis_error = on_redis_error
        self._last_logged: float | None = None
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=REDIS_MAX_CONNECTIONS,
            timeout=REDIS_POOL_WAIT_TIMEOUT,
            decode_responses=True,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
            retry=Retry(NoBackoff(), REDIS_RETRIES),
        )
        self._redis = aioredis.Redis.from_pool(pool)
        self.limiter = RedisRateLimiter(self._redis, prefix=prefix, clock=clock)
        self.budgets = RedisBudgets(self._redis, prefix=prefix, clock=clock)

    def _usage_key(self, member: str) -> str:
        return f"{self.prefix}usage:{member}"

    @property
    def _usage_index(self) -> str:
        return f"{self.prefix}usage-index"

    def _redis_failed(self, error: BaseException) -> None:
        """Count every failure; log one a minute at most, never with a password."""
        if self._on_redis_error is not None:
            self._on_redis_error()
        clock = time.monotonic()
        if self._last_logged is not None and clock - self._last_logged < ERROR_LOG_INTERVAL:
            return
        self._last_logged = clock
        detail = f"{type(error).__name__}: {error}"
        for password in self._passwords:
            detail = detail.replace(password, "***")
        log.warning(
            "quota store %s unavailable (%s); %s. Further Redis errors are counted "
            "but not logged for %d s.",
            self.safe_url,
            detail,
            "admitting requests without rate limits or budgets"
            if self.on_error == "open"
            else "refusing limited keys with 503",
            ERROR_LOG_INTERVAL,
        )

    async def admit(self, key: CallerKey, estimate: Estimate) -> Decision:
        """Admit and charge a request of `key` atomically across processes, or refuse it."""
        if not has_limits(key):
            return Decision()
        try:
            return await admit_with(self.limiter, self.budgets, key, estimate)
        except _REDIS_FAILURES as error:
            self._redis_failed(error)
            if self.on_error == "open":
                return Decision()
            raise GatewayError(
                503,
                "quota_unavailable",
                "Rate limits cannot be checked right now (the quota store is unreachable); "
                "retry shortly.",
            ) from None

    async def record_usage(
        self,
        key_name: str,
        key: CallerKey | None,
        deployment: str,
        usage: TokenUsage,
        cost_usd: float,
        charge: Charge | None = None,
    ) -> None:
        """Settle one answered request: correct its charge, add it to budgets and the report.

        A Redis failure is counted and logged, never raised.
        """
        member = json.dumps([key_name, deployment])
        usage_key = self._usage_key(member)
        try:
            await settle_with(self.limiter, self.budgets, key, usage.total, cost_usd, charge)
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hincrby(usage_key, "requests", 1)
                pipe.hincrby(usage_key, "prompt_tokens", usage.input_tokens)
                pipe.hincrby(usage_key, "completion_tokens", usage.output_tokens)
                if cost_usd:
                    pipe.hincrbyfloat(usage_key, COST_FIELD, cost_usd)
                pipe.sadd(self._usage_index, member)
                await pipe.execute()
        except _REDIS_FAILURES as error:
            self._redis_failed(error)

    async def usage_report(self) -> dict:
        """`{"keys": {name: {deployment: {...}}}}` for every process sharing this Redis.

        Raises a 503 GatewayError when Redis cannot be reached.
        """
        try:
            members = sorted(map(str, await self._redis.smembers(self._usage_index)))
            async with self._redis.pipeline(transaction=False) as pipe:
                for member in members:
                    pipe.hgetall(self._usage_key(member))
                hashes = await pipe.execute()
        except _REDIS_FAILURES as error:
            self._redis_failed(error)
            raise GatewayError(
                503, "quota_unavailable", "The usage report is unavailable right now."
            ) from None
        usage: dict[str, dict[str, dict[str, float]]] = {}
        for member, counters in zip(members, hashes, strict=True):
            key_name, deployment = json.loads(member)
            row: dict[str, float] = {name: int(counters.get(name, 0)) for name in _USAGE_FIELDS}
            row[COST_FIELD] = float(counters.get(COST_FIELD, 0))
            usage.setdefault(key_name, {})[deployment] = row
        return _sorted_report(usage)

    async def window_usage(self, key: CallerKey) -> WindowUsage:
        """`key`'s requests and tokens in the current window, for every process sharing Redis.

        Raises a 503 GatewayError when Redis cannot be reached.
        """
        try:
            used = await self.limiter.usage(key.name)
        except _REDIS_FAILURES as error:
            self._redis_failed(error)
            raise GatewayError(
                503, "quota_unavailable", "The quotas are unavailable right now."
            ) from None
        return WindowUsage(used.requests, used.tokens, used.frees_in_seconds)

    async def close(self) -> None:
        """Close the connections to Redis."""
        await self._redis.aclose()
