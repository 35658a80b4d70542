"""Per-key requests- and tokens-per-minute limits, and the usage report.

Windows are fixed and follow the wall clock: a request at time `now` counts
in window `int(now // 60)`, the current calendar minute, and every counter
starts again at zero when the minute turns. Window counters expire 2 minutes
after they are created. With several processes (or hosts) sharing Redis,
their clocks must agree (NTP) for them to agree on the minute.

A request is admitted when the key has made fewer than `rpm` requests in the
window *and* used fewer than `tpm` tokens in it; an admitted request is
counted at once, a refused one is not. Tokens are known only after Azure
answers, so `record_usage` adds them later (to the window current *then*):
the request that crosses `tpm` is let through, and the ones after it wait
for the next minute.

Two stores share one interface (`QuotaStore`):

- `MemoryQuota` counts in this process only: with several PM2 instances each
  enforces the limits alone, so a key may get up to N times its limits, and
  each reports only its own usage.
- `RedisQuota` counts in Redis. One Lua script checks both limits and counts
  the request in a single step, so processes sharing Redis never admit more
  than `rpm` between them. When Redis cannot be reached it either admits
  (`on_error="open"`) or refuses with a 503 (`"closed"`); each failure calls
  `on_redis_error` and at most one warning a minute is logged. Recording
  usage never fails a request: after Azure has answered there is nothing
  left to refuse.

Usage-report counters never expire: they run from when the store was empty
(for `MemoryQuota`, since the process started).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol
from urllib.parse import parse_qs, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import GatewayError
from gateway.policy.keys import CallerKey

log = logging.getLogger("azure-gpt-api.quota")

WINDOW_SECONDS = 60
COUNTER_TTL_SECONDS = 2 * WINDOW_SECONDS
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


@dataclass(frozen=True)
class Admission:
    """Whether a request may go on, and the rate-limit headers to answer with.

    `limit` is "requests" or "tokens" when refused; `retry_after` is the
    whole seconds until the window ends (at least 1) when refused, else 0.
    """

    allowed: bool
    limit: str | None
    retry_after: int
    headers: dict[str, str] = field(default_factory=dict)


class WindowUsage(NamedTuple):
    """What a key used in the current window, and when the window ends."""

    requests: int
    tokens: int
    resets_in_seconds: int


class QuotaStore(Protocol):
    async def admit(self, key: CallerKey, now: float | None = None) -> Admission: ...

    async def record_usage(
        self,
        key_name: str,
        key: CallerKey | None,
        deployment: str,
        prompt_tokens: int,
        completion_tokens: int,
        now: float | None = None,
    ) -> None: ...

    async def usage_report(self) -> dict: ...

    async def window_usage(self, key: CallerKey, now: float | None = None) -> WindowUsage: ...

    async def close(self) -> None: ...


def window_of(now: float) -> int:
    """The fixed window `now` falls in: the wall-clock minute."""
    return int(now // WINDOW_SECONDS)


def seconds_to_next_window(now: float) -> int:
    """Whole seconds until the current window ends, at least 1."""
    return max(1, math.ceil((window_of(now) + 1) * WINDOW_SECONDS - now))


def has_limits(key: CallerKey) -> bool:
    return key.rpm is not None or key.tpm is not None


def build_admission(
    key: CallerKey, *, limit: str | None, requests: int, tokens: int, now: float
) -> Admission:
    """The decision with its headers; `requests` counts this request when it is admitted."""
    headers: dict[str, str] = {}
    if key.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(key.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, key.rpm - requests))
    if key.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(key.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, key.tpm - tokens))
    if limit is None:
        return Admission(True, None, 0, headers)
    retry_after = seconds_to_next_window(now)
    headers["Retry-After"] = str(retry_after)
    return Admission(False, limit, retry_after, headers)


def _exceeded(key: CallerKey, requests: int, tokens: int) -> str | None:
    if key.rpm is not None and requests >= key.rpm:
        return "requests"
    if key.tpm is not None and tokens >= key.tpm:
        return "tokens"
    return None


def _sorted_report(usage: dict[str, dict[str, dict[str, int]]]) -> dict:
    return {
        "keys": {
            name: {deployment: dict(usage[name][deployment]) for deployment in sorted(usage[name])}
            for name in sorted(usage)
        }
    }


class MemoryQuota:
    """Limits and usage counted in this process; see the module docstring for what that means."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._requests: dict[tuple[str, int], int] = {}
        self._tokens: dict[tuple[str, int], int] = {}
        self._usage: dict[str, dict[str, dict[str, int]]] = {}

    def _forget_before(self, window: int) -> None:
        for counters in (self._requests, self._tokens):
            for stale in [entry for entry in counters if entry[1] < window - 1]:
                del counters[stale]

    async def admit(self, key: CallerKey, now: float | None = None) -> Admission:
        """Admit and count a request of `key`, or refuse it without counting it."""
        now = self._clock() if now is None else now
        if not has_limits(key):
            return Admission(True, None, 0, {})
        window = window_of(now)
        self._forget_before(window)
        requests = self._requests.get((key.name, window), 0)
        tokens = self._tokens.get((key.name, window), 0)
        limit = _exceeded(key, requests, tokens)
        if limit is None:
            requests += 1
            self._requests[(key.name, window)] = requests
        return build_admission(key, limit=limit, requests=requests, tokens=tokens, now=now)

    async def record_usage(
        self,
        key_name: str,
        key: CallerKey | None,
        deployment: str,
        prompt_tokens: int,
        completion_tokens: int,
        now: float | None = None,
    ) -> None:
        """Add one answered request's tokens to `key`'s window and to the usage report."""
        now = self._clock() if now is None else now
        if key is not None and key.tpm is not None:
            window = window_of(now)
            self._forget_before(window)
            entry = (key.name, window)
            self._tokens[entry] = self._tokens.get(entry, 0) + prompt_tokens + completion_tokens
        counters = self._usage.setdefault(key_name, {}).setdefault(
            deployment, dict.fromkeys(_USAGE_FIELDS, 0)
        )
        counters["requests"] += 1
        counters["prompt_tokens"] += prompt_tokens
        counters["completion_tokens"] += completion_tokens

    async def usage_report(self) -> dict:
        """`{"keys": {name: {deployment: {"requests", "prompt_tokens", "completion_tokens"}}}}`."""
        return _sorted_report(self._usage)

    async def window_usage(self, key: CallerKey, now: float | None = None) -> WindowUsage:
        """`key`'s requests and tokens in the current window (counted only for limited keys)."""
        now = self._clock() if now is None else now
        window = window_of(now)
        return WindowUsage(
            self._requests.get((key.name, window), 0),
            self._tokens.get((key.name, window), 0),
            seconds_to_next_window(now),
        )

    async def close(self) -> None:
        """Nothing to release; here so both stores close the same way."""


# Check both limits and count the request in one atomic step.
# KEYS[1]: requests in the window; KEYS[2]: tokens in the window.
# ARGV[1]: rpm, ARGV[2]: tpm (0 = no such limit); ARGV[3]: counter TTL (s).
# Returns {admitted 1/0, refused limit or '', requests, tokens}.
_ADMIT_SCRIPT = """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local requests = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
if rpm > 0 and requests >= rpm then
  return {0, 'requests', requests, tokens}
end
if tpm > 0 and tokens >= tpm then
  return {0, 'tokens', requests, tokens}
end
if rpm > 0 then
  requests = redis.call('INCR', KEYS[1])
  if requests == 1 then
    redis.call('EXPIRE', KEYS[1], ARGV[3])
  end
end
return {1, '', requests, tokens}
"""


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
    """Limits and usage counted in Redis, shared by every process that uses the same server.

    Keys are prefixed with `prefix`: `azgw:requests:<key>:<window>` and
    `azgw:tokens:<key>:<window>` (expiring), `azgw:usage:["<key>","<deployment>"]`
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
        self._clock = clock
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
        self._admit_script = self._redis.register_script(_ADMIT_SCRIPT)

    def _requests_key(self, name: str, window: int) -> str:
        return f"{self.prefix}requests:{name}:{window}"

    def _tokens_key(self, name: str, window: int) -> str:
        return f"{self.prefix}tokens:{name}:{window}"

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
            "admitting requests without rate limits"
            if self.on_error == "open"
            else "refusing rate-limited keys with 503",
            ERROR_LOG_INTERVAL,
        )

    async def admit(self, key: CallerKey, now: float | None = None) -> Admission:
        """Admit and count a request of `key` atomically across processes, or refuse it."""
        now = self._clock() if now is None else now
        if not has_limits(key):
            return Admission(True, None, 0, {})
        window = window_of(now)
        try:
            admitted, limit, requests, tokens = await self._admit_script(
                keys=[self._requests_key(key.name, window), self._tokens_key(key.name, window)],
                args=[key.rpm or 0, key.tpm or 0, COUNTER_TTL_SECONDS],
            )
        except _REDIS_FAILURES as error:
            self._redis_failed(error)
            if self.on_error == "open":
                return Admission(True, None, 0, {})
            raise GatewayError(
                503,
                "quota_unavailable",
                "Rate limits cannot be checked right now (the quota store is unreachable); "
                "retry shortly.",
            ) from None
        return build_admission(
            key,
            limit=None if admitted else limit,
            requests=int(requests),
            tokens=int(tokens),
            now=now,
        )

    async def record_usage(
        self,
        key_name: str,
        key: CallerKey | None,
        deployment: str,
        prompt_tokens: int,
        completion_tokens: int,
        now: float | None = None,
    ) -> None:
        """Add one answered request's tokens to `key`'s window and to the usage report.

        A Redis failure is counted and logged, never raised.
        """
        now = self._clock() if now is None else now
        member = json.dumps([key_name, deployment])
        usage_key = self._usage_key(member)
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                total = prompt_tokens + completion_tokens
                if key is not None and key.tpm is not None and total:
                    tokens_key = self._tokens_key(key.name, window_of(now))
                    pipe.incrby(tokens_key, total)
                    pipe.expire(tokens_key, COUNTER_TTL_SECONDS)
                pipe.hincrby(usage_key, "requests", 1)
                pipe.hincrby(usage_key, "prompt_tokens", prompt_tokens)
                pipe.hincrby(usage_key, "completion_tokens", completion_tokens)
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
        usage: dict[str, dict[str, dict[str, int]]] = {}
        for member, counters in zip(members, hashes, strict=True):
            key_name, deployment = json.loads(member)
            usage.setdefault(key_name, {})[deployment] = {
                name: int(counters.get(name, 0)) for name in _USAGE_FIELDS
            }
        return _sorted_report(usage)

    async def window_usage(self, key: CallerKey, now: float | None = None) -> WindowUsage:
        """`key`'s requests and tokens in the current window, for every process sharing Redis.

        Raises a 503 GatewayError when Redis cannot be reached.
        """
        now = self._clock() if now is None else now
        window = window_of(now)
        try:
            requests, tokens = await self._redis.mget(
                self._requests_key(key.name, window), self._tokens_key(key.name, window)
            )
        except _REDIS_FAILURES as error:
            self._redis_failed(error)
            raise GatewayError(
                503, "quota_unavailable", "The quotas are unavailable right now."
            ) from None
        return WindowUsage(int(requests or 0), int(tokens or 0), seconds_to_next_window(now))

    async def close(self) -> None:
        """Close the connections to Redis."""
        await self._redis.aclose()
