"""Per-key budgets over UTC calendar days and months, in tokens and in US dollars.

A key may have `tokens_per_day`, `tokens_per_month` and `usd_per_month`.
Budgets count what Azure reported (`record`, once the answer's usage is
known), and `check` refuses a request once a budget is used up: the request
that crosses a budget is answered, the ones after it are refused until the
period ends (midnight UTC, or the first of the month). A refusal is a 429
whose `Retry-After` and message give that reset time; when several budgets
are used up, the latest reset is the one that counts.

Cost comes from the deployment's `price` (US dollars per million tokens):
input tokens at `input_per_1m`, the cached part of them at
`cached_input_per_1m` (the input price when absent), output tokens at
`output_per_1m`. A deployment without a price costs nothing, so a
`usd_per_month` budget only sees deployments that have one.

Stores: `MemoryBudgets` counts in this process; `RedisBudgets` in Redis,
shared by every process using it (counters expire a day after their period
ends). Checks and records are separate steps, so requests in flight when a
budget runs out are still answered and counted. Redis errors propagate, for
the caller's open/closed policy to handle.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import redis.asyncio as aioredis

from ..errors import GatewayError

DEFAULT_REDIS_PREFIX = "azgw:"
PER_MILLION = 1_000_000
# Counters outlive their period by this long, so a late report can still read them.
EXPIRY_MARGIN_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Price:
    """A deployment's prices in US dollars per million tokens."""

    input_per_1m: float
    output_per_1m: float
    cached_input_per_1m: float | None = None

    @classmethod
    def from_config(cls, entry: Mapping[str, Any]) -> Price:
        """From a deployments-file `price:` mapping (checked by its schema)."""
        cached = entry.get("cached_input_per_1m")
        return cls(
            input_per_1m=float(entry["input_per_1m"]),
            output_per_1m=float(entry["output_per_1m"]),
            cached_input_per_1m=None if cached is None else float(cached),
        )


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(frozen=True)
class TokenUsage:
    """An answer's tokens, whichever API reported them."""

    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0

    @property
    def total(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_usage(cls, usage: Any) -> TokenUsage:
        """From a `usage` object: chat's and embeddings' `prompt_tokens` /
        `completion_tokens` / `prompt_tokens_details.cached_tokens`, or the
        Responses API's `input_tokens` / `output_tokens` /
        `input_tokens_details.cached_tokens`. Missing or odd fields count 0."""
        if not isinstance(usage, Mapping):
            return cls()
        if "input_tokens" in usage or "output_tokens" in usage:
            input_tokens, output_tokens = usage.get("input_tokens"), usage.get("output_tokens")
            details = usage.get("input_tokens_details")
        else:
            input_tokens, output_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
            details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        inputs = _count(input_tokens)
        return cls(inputs, min(_count(cached), inputs), _count(output_tokens))


def cost_usd(usage: TokenUsage, price: Price | None) -> float:
    """What `usage` costs at `price` (nothing without a price)."""
    if price is None:
        return 0.0
    cached_price = (
        price.input_per_1m if price.cached_input_per_1m is None else (price.cached_input_per_1m)
    )
    uncached = usage.input_tokens - usage.cached_input_tokens
    return (
        uncached * price.input_per_1m
        + usage.cached_input_tokens * cached_price
        + usage.output_tokens * price.output_per_1m
    ) / PER_MILLION


@dataclass(frozen=True)
class Budget:
    """A key's budgets; None is no budget."""

    name: str
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    usd_per_month: float | None = None

    @property
    def limited(self) -> bool:
        return any(
            value is not None
            for value in (self.tokens_per_day, self.tokens_per_month, self.usd_per_month)
        )

    @classmethod
    def from_config(cls, name: str, entry: Mapping[str, Any]) -> Budget:
        """From a `keys:` entry (checked by its schema)."""
        usd = entry.get("usd_per_month")
        return cls(
            name=name,
            tokens_per_day=entry.get("tokens_per_day"),
            tokens_per_month=entry.get("tokens_per_month"),
            usd_per_month=None if usd is None else float(usd),
        )


@dataclass(frozen=True)
class Period:
    """A UTC calendar day or month: its id in counter names, and when it ends."""

    kind: str
    id: str
    ends: datetime


def periods(now: float) -> tuple[Period, Period]:
    """The UTC day and month `now` falls in."""
    moment = datetime.fromtimestamp(now, tz=UTC)
    day_start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = day_start.replace(day=1)
    next_month = (month_start + timedelta(days=32)).replace(day=1)
    return (
        Period("day", day_start.strftime("%Y-%m-%d"), day_start + timedelta(days=1)),
        Period("month", month_start.strftime("%Y-%m"), next_month),
    )


@dataclass(frozen=True)
class Spent:
    """What a key used in the current day and month."""

    tokens_today: int = 0
    tokens_this_month: int = 0
    usd_this_month: float = 0.0


def over_budget(budget: Budget, spent: Spent, now: float) -> GatewayError | None:
    """The 429 for a key that has used up a budget, naming the latest reset; else None."""
    day, month = periods(now)
    exhausted = []
    if budget.tokens_per_day is not None and spent.tokens_today >= budget.tokens_per_day:
        exhausted.append(
            (day.ends, f"tokens_per_day budget ({budget.tokens_per_day} tokens a day)")
        )
    if budget.tokens_per_month is not None and spent.tokens_this_month >= budget.tokens_per_month:
        exhausted.append(
            (month.ends, f"tokens_per_month budget ({budget.tokens_per_month} tokens a month)")
        )
    if budget.usd_per_month is not None and spent.usd_this_month >= budget.usd_per_month:
        exhausted.append(
            (month.ends, f"usd_per_month budget (US${budget.usd_per_month:g} a month)")
        )
    if not exhausted:
        return None
    ends, what = max(exhausted)
    wait = ends.timestamp() - now
    reset = ends.strftime("%Y-%m-%dT%H:%M:%SZ")
    return GatewayError(
        429,
        "budget_exceeded",
        f"The API key {budget.name!r} has used its {what}; it resets at {reset}.",
        headers={
            "Retry-After": str(max(1, math.ceil(wait))),
            "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
        },
    )


class BudgetStore(Protocol):
    async def spent(self, name: str) -> Spent: ...

    async def check(self, budget: Budget) -> GatewayError | None: ...

    async def record(self, name: str, tokens: int, usd: float) -> None: ...


class MemoryBudgets:
    """Budgets counted in this process only."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        # (key name, "tokens" | "usd", period kind, period id) -> amount
        self._counters: dict[tuple[str, str, str, str], float] = {}

    async def spent(self, name: str) -> Spent:
        """This key's use in the current UTC day and month."""
        return self._spent(name, self._clock())

    def _spent(self, name: str, now: float) -> Spent:
        day, month = periods(now)
        return Spent(
            int(self._counters.get((name, "tokens", day.kind, day.id), 0)),
            int(self._counters.get((name, "tokens", month.kind, month.id), 0)),
            self._counters.get((name, "usd", month.kind, month.id), 0.0),
        )

    async def check(self, budget: Budget) -> GatewayError | None:
        """The 429 to answer when `budget` is used up, else None."""
        if not budget.limited:
            return None
        now = self._clock()
        return over_budget(budget, self._spent(budget.name, now), now)

    async def record(self, name: str, tokens: int, usd: float) -> None:
        """Add one answer's tokens and cost to the key's current day and month."""
        day, month = periods(self._clock())
        current = {day.id, month.id}
        for stale in [entry for entry in self._counters if entry[3] not in current]:
            del self._counters[stale]
        for entry, amount in (
            ((name, "tokens", day.kind, day.id), tokens),
            ((name, "tokens", month.kind, month.id), tokens),
            ((name, "usd", month.kind, month.id), usd),
        ):
            self._counters[entry] = self._counters.get(entry, 0) + amount


class RedisBudgets:
    """Budgets counted in Redis: `<prefix>budget:<kind>:<period>:<key>` counters."""

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

    def _keys(self, name: str, now: float) -> tuple[tuple[str, Period], ...]:
        day, month = periods(now)
        return (
            (f"{self._prefix}budget:tokens:{day.id}:{name}", day),
            (f"{self._prefix}budget:tokens:{month.id}:{name}", month),
            (f"{self._prefix}budget:usd:{month.id}:{name}", month),
        )

    async def spent(self, name: str) -> Spent:
        """This key's use in the current UTC day and month, over every process."""
        return await self._spent(name, self._clock())

    async def _spent(self, name: str, now: float) -> Spent:
        keys = [key for key, _ in self._keys(name, now)]
        tokens_today, tokens_month, usd = await self._redis.mget(keys)
        return Spent(int(tokens_today or 0), int(tokens_month or 0), float(usd or 0))

    async def check(self, budget: Budget) -> GatewayError | None:
        """The 429 to answer when `budget` is used up, else None."""
        if not budget.limited:
            return None
        now = self._clock()
        return over_budget(budget, await self._spent(budget.name, now), now)

    async def record(self, name: str, tokens: int, usd: float) -> None:
        """Add one answer's tokens and cost to the key's current day and month."""
        (day_tokens, day), (month_tokens, month), (month_usd, _) = self._keys(name, self._clock())
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.incrby(day_tokens, tokens)
            pipe.incrby(month_tokens, tokens)
            pipe.incrbyfloat(month_usd, usd)
            for key, period in ((day_tokens, day), (month_tokens, month), (month_usd, month)):
                pipe.expireat(key, int(period.ends.timestamp()) + EXPIRY_MARGIN_SECONDS)
            await pipe.execute()
