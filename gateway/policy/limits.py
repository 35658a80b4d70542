"""Per-key requests- and tokens-per-minute limits over a sliding 60-second window.

The algorithm
-------------
Every admitted request is charged, with its estimated tokens, to the
one-second bucket of its admission time. A request arriving at `now` is
admitted when what the buckets from `floor(now) - 60` up to now hold, plus
this request, stays within `rpm` and `tpm`. Those buckets cover at least
the 60 s before `now`, so in any 60-second span the last request admitted
saw every earlier one in the span: no span ever holds more than the limit.
A refused request is charged nothing; its `Retry-After` is when enough of
the oldest buckets will have left the window for it to fit.

Why not a token bucket (GCRA)? A bucket that lets a key burst to its whole
limit refills at limit/60 per second, so a 60 s span can admit a full bucket
plus a minute's refill: twice the limit, the very overshoot the fixed
windows had. Only a burst of one request would keep a span within the
limit, which would make an `rpm: 60` key wait a second between any two
requests. The bucketed window keeps bursts and the 60 s bound at a fixed
cost of 61 counters per key and limit.

Tokens are charged as estimated at admission (`Decision.charge`); when the
answer's usage is known, `correct` moves the charge to the real figure,
still in the admission's bucket. A charge older than the window has left it
already, and is not corrected: no span that holds the admission holds the
correction's time.

A request whose estimate alone exceeds the key's `tpm` can never fit and is
refused at once, without `Retry-After` (OpenAI's way of saying a 429 needs
the caller to change something). When the estimate exceeds it only with the
default completion budget (the caller set none), the charge is capped at
`tpm` instead.

Stores: `MemoryRateLimiter` counts in this process; `RedisRateLimiter`
counts in Redis with one Lua script that checks and charges atomically, so
processes sharing a Redis never admit more than the limit between them. It
takes the time from the caller's clock: hosts must agree on it (NTP).
Redis errors propagate, for the caller's open/closed policy to handle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import redis.asyncio as aioredis

from ..errors import GatewayError
from .estimate import Estimate

WINDOW_SECONDS = 60
# Buckets a check adds up: the current second and the 60 before it.
WINDOW_BUCKETS = WINDOW_SECONDS + 1
DEFAULT_REDIS_PREFIX = "azgw:"


@dataclass(frozen=True)
class KeyLimits:
    """A caller key's per-minute limits; None is no limit."""

    name: str
    rpm: int | None = None
    tpm: int | None = None

    @property
    def limited(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True)
class Charge:
    """What an admitted request was charged, for `correct` to settle later."""

    key: str
    bucket: int
    tokens: int


@dataclass(frozen=True)
class Decision:
    """An admission: the headers for the answer, and the charge or the refusal.

    `refusal` is the 429 to raise when refused, and `limit` the limit that
    refused it ("requests", "tokens", or "budget" when gateway/policy/quota.py
    refused it for a budget); `charge` is None for a key without a `tpm`
    (nothing to correct) and for a refusal.
    """

    headers: dict[str, str] = field(default_factory=dict)
    charge: Charge | None = None
    refusal: GatewayError | None = None
    limit: str | None = None

    @property
    def allowed(self) -> bool:
        return self.refusal is None


def tokens_to_charge(limits: KeyLimits, estimate: Estimate) -> int | GatewayError:
    """The tokens admission charges, or the 429 for a request that can never fit."""
    if limits.tpm is None:
        return 0
    tokens = estimate.total
    if tokens <= limits.tpm:
        return tokens
    if estimate.prompt_tokens > limits.tpm:
        reason = f"its prompt alone is estimated at {estimate.prompt_tokens} tokens"
    elif estimate.completion_explicit:
        reason = (
            f"its prompt (estimated at {estimate.prompt_tokens} tokens) plus its "
            f"completion budget of {estimate.completion_tokens} come to {tokens} tokens"
        )
    else:
        return limits.tpm
    return GatewayError(
        429,
        "tokens_exceed_limit",
        f"This request can never be admitted for the API key {limits.name!r}: {reason}, "
        f"more than the key's limit of {limits.tpm} tokens per minute. No retry will help; "
        "send a shorter request or a smaller completion budget.",
    )


def _cost_or_decision(limits: KeyLimits, estimate: Estimate) -> int | Decision:
    """The tokens to charge, or the Decision that needs no window: both limiters
    pass a key without limits and refuse a request that can never fit alike."""
    if not limits.limited:
        return Decision()
    cost = tokens_to_charge(limits, estimate)
    if isinstance(cost, GatewayError):
        return Decision(refusal=cost, limit="tokens")
    return cost


def _headers(limits: KeyLimits, requests: int, tokens: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if limits.rpm is not None:
        headers["x-ratelimit-limit-requests"] = str(limits.rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, limits.rpm - requests))
    if limits.tpm is not None:
        headers["x-ratelimit-limit-tokens"] = str(limits.tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, limits.tpm - tokens))
    return headers


def _refusal(limits: KeyLimits, limit: str, wait: float, headers: dict[str, str]) -> GatewayError:
    wait = max(wait, 0.001)
    per_minute = limits.rpm if limit == "requests" else limits.tpm
    return GatewayError(
        429,
        "rate_limit_exceeded",
        f"The API key {limits.name!r} has used its {per_minute} {limit} per minute; "
        f"retry after {math.ceil(wait)} s.",
        headers={
            **headers,
            "Retry-After": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(math.ceil(wait * 1000)),
        },
    )


def seconds_until_fits(
    buckets: dict[int, int], used: int, cost: int, limit: int, now: float
) -> float:
    """How long until the oldest buckets have left the window enough for `cost` to fit."""
    for bucket in sorted(buckets):
        used -= buckets[bucket]
        if used + cost <= limit:
            return bucket + WINDOW_BUCKETS - now
    return WINDOW_BUCKETS


class RateLimiter(Protocol):
    async def admit(self, limits: KeyLimits, estimate: Estimate) -> Decision: ...

    async def correct(self, charge: Charge, actual_tokens: int) -> None: ...

    async def usage(self, name: str) -> WindowUse: ...


@dataclass(frozen=True)
class WindowUse:
    """What a key has used in the window now, and when its oldest charge leaves it."""

    requests: int
    tokens: int
    frees_in_seconds: int


def window_use(requests: dict[int, int], tokens: dict[int, int], now: float) -> WindowUse:
    """The window's sums; `frees_in_seconds` is 0 for an empty window."""
    oldest = min((*requests, *tokens), default=None)
    frees = 0 if oldest is None else max(0, math.ceil(oldest + WINDOW_BUCKETS - now))
    return WindowUse(sum(requests.values()), sum(tokens.values()), frees)


class MemoryRateLimiter:
    """Sliding-window limits counted in this process only."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (key name, "requests" | "tokens") -> {bucket second: amount}
        self._buckets: dict[tuple[str, str], dict[int, int]] = {}

    def _window(self, name: str, kind: str, bucket: int) -> dict[int, int]:
        buckets = self._buckets.setdefault((name, kind), {})
        for old in [b for b in buckets if b <= bucket - WINDOW_BUCKETS]:
            del buckets[old]
        return buckets

    async def admit(self, limits: KeyLimits, estimate: Estimate) -> Decision:
        """Admit and charge a request of `limits.name`, or refuse it without charging it."""
        cost = _cost_or_decision(limits, estimate)
        if isinstance(cost, Decision):
            return cost
        now = self._clock()
        bucket = math.floor(now)
        requests = self._window(limits.name, "requests", bucket)
        tokens = self._window(limits.name, "tokens", bucket)
        used_requests, used_tokens = sum(requests.values()), sum(tokens.values())
        if limits.rpm is not None and used_requests + 1 > limits.rpm:
            wait = seconds_until_fits(requests, used_requests, 1, limits.rpm, now)
            headers = _headers(limits, used_requests, used_tokens)
            return Decision(
                headers, refusal=_refusal(limits, "requests", wait, headers), limit="requests"
            )
        if limits.tpm is not None and used_tokens + cost > limits.tpm:
            wait = seconds_until_fits(tokens, used_tokens, cost, limits.tpm, now)
            headers = _headers(limits, used_requests, used_tokens)
            return Decision(
                headers, refusal=_refusal(limits, "tokens", wait, headers), limit="tokens"
            )
        requests[bucket] = requests.get(bucket, 0) + 1
        charge = None
        if limits.tpm is not None:
            tokens[bucket] = tokens.get(bucket, 0) + cost
            charge = Charge(limits.name, bucket, cost)
        return Decision(_headers(limits, used_requests + 1, used_tokens + cost), charge)

    async def correct(self, charge: Charge, actual_tokens: int) -> None:
        """Replace `charge`'s estimate by `actual_tokens`, while its bucket is in the window."""
        buckets = self._window(charge.key, "tokens", math.floor(self._clock()))
        if charge.bucket in buckets:
            buckets[charge.bucket] = max(0, buckets[charge.bucket] + actual_tokens - charge.tokens)

    async def usage(self, name: str) -> WindowUse:
        now = self._clock()
        bucket = math.floor(now)
        return window_use(
            self._window(name, "requests", bucket), self._window(name, "tokens", bucket), now
        )


# Check both limits and charge the request in one atomic step.
# KEYS[1]: requests hash, KEYS[2]: tokens hash ({bucket second: amount}).
# ARGV: bucket now, rpm, tpm (0 = none), tokens to charge, window buckets.
# Returns {refused limit or '', used requests, used tokens, bucket, amount, ...}:
# the window's buckets of the refused limit, oldest first, for the retry time.
_ADMIT_SCRIPT = """
local now = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local width = tonumber(ARGV[5])
local function window(key)
  local flat = redis.call('HGETALL', key)
  local buckets, used = {}, 0
  for i = 1, #flat, 2 do
    local bucket = tonumber(flat[i])
    if bucket <= now - width then
      redis.call('HDEL', key, flat[i])
    else
      local amount = tonumber(flat[i + 1])
      used = used + amount
      table.insert(buckets, {bucket, amount})
    end
  end
  table.sort(buckets, function(a, b) return a[1] < b[1] end)
  return buckets, used
end
local function refuse(limit, used_requests, used_tokens, buckets)
  local reply = {limit, used_requests, used_tokens}
  for _, entry in ipairs(buckets) do
    table.insert(reply, entry[1])
    table.insert(reply, entry[2])
  end
  return reply
end
local requests, used_requests = window(KEYS[1])
local tokens, used_tokens = window(KEYS[2])
if rpm > 0 and used_requests + 1 > rpm then
  return refuse('requests', used_requests, used_tokens, requests)
end
if tpm > 0 and used_tokens + cost > tpm then
  return refuse('tokens', used_requests, used_tokens, tokens)
end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('EXPIRE', KEYS[1], width + 1)
if tpm > 0 then
  redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[4])
  redis.call('EXPIRE', KEYS[2], width + 1)
end
return {'', used_requests + 1, used_tokens + cost}
"""

# Move a charge to the real figure if its bucket is still in the window.
# KEYS[1]: tokens hash; ARGV: bucket, difference, bucket now, window buckets.
_CORRECT_SCRIPT = """
local bucket = tonumber(ARGV[1])
if bucket <= tonumber(ARGV[3]) - tonumber(ARGV[4]) then
  return 0
end
local amount = redis.call('HGET', KEYS[1], ARGV[1])
if not amount then
  return 0
end
local corrected = math.max(0, tonumber(amount) + tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], ARGV[1], corrected)
return 1
"""


class RedisRateLimiter:
    """Sliding-window limits counted in Redis, shared by every process using it.

    Keys: `<prefix>window:requests:<key>` and `<prefix>window:tokens:<key>`,
    hashes of bucket second -> amount that expire a window after their
    last charge.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        prefix: str = DEFAULT_REDIS_PREFIX,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self._admit_script = redis.register_script(_ADMIT_SCRIPT)
        self._correct_script = redis.register_script(_CORRECT_SCRIPT)

    def _key(self, kind: str, name: str) -> str:
        return f"{self._prefix}window:{kind}:{name}"

    async def admit(self, limits: KeyLimits, estimate: Estimate) -> Decision:
        """Admit and charge a request atomically across processes, or refuse it."""
        cost = _cost_or_decision(limits, estimate)
        if isinstance(cost, Decision):
            return cost
        now = self._clock()
        bucket = math.floor(now)
        reply = await self._admit_script(
            keys=[self._key("requests", limits.name), self._key("tokens", limits.name)],
            args=[bucket, limits.rpm or 0, limits.tpm or 0, cost, WINDOW_BUCKETS],
        )
        limit = reply[0].decode() if isinstance(reply[0], bytes) else reply[0]
        used_requests, used_tokens = int(reply[1]), int(reply[2])
        headers = _headers(limits, used_requests, used_tokens)
        if not limit:
            return Decision(headers, Charge(limits.name, bucket, cost) if limits.tpm else None)
        buckets = {int(reply[i]): int(reply[i + 1]) for i in range(3, len(reply), 2)}
        if limit == "requests":
            wait = seconds_until_fits(buckets, used_requests, 1, limits.rpm or 0, now)
        else:
            wait = seconds_until_fits(buckets, used_tokens, cost, limits.tpm or 0, now)
        return Decision(headers, refusal=_refusal(limits, limit, wait, headers), limit=limit)

    async def correct(self, charge: Charge, actual_tokens: int) -> None:
        """Replace `charge`'s estimate by `actual_tokens`, while its bucket is in the window."""
        if actual_tokens == charge.tokens:
            return
        await self._correct_script(
            keys=[self._key("tokens", charge.key)],
            args=[
                charge.bucket,
                actual_tokens - charge.tokens,
                math.floor(self._clock()),
                WINDOW_BUCKETS,
            ],
        )

    async def usage(self, name: str) -> WindowUse:
        """Read-only: buckets past the window are left for the next admission to drop."""
        now = self._clock()
        oldest_kept = math.floor(now) - WINDOW_BUCKETS

        async def window(kind: str) -> dict[int, int]:
            flat = await self._redis.hgetall(self._key(kind, name))
            buckets = {int(bucket): int(amount) for bucket, amount in flat.items()}
            return {bucket: amount for bucket, amount in buckets.items() if bucket > oldest_kept}

        return window_use(await window("requests"), await window("tokens"), now)
