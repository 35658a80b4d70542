"""Which deployment holds a stored response: response id -> deployment name.

A response lives on the Azure resource that made it (PROTOCOL-v1.md section
6): a create with `previous_response_id`, and every retrieve, delete, cancel
or input_items for an id, can only succeed there. The gateway records the
deployment of every stored response it creates and sends each follow-up to
it, never to another (the pipeline pins the request to that one deployment).
Ids carry no hint of their resource, so an id the gateway has not recorded
(made before a restart, or through another gateway) is looked up on each
deployment in turn.

Two stores share one interface (`AffinityStore`):

- `MemoryAffinity` remembers in this process only;
- `RedisAffinity` remembers in Redis (`REDIS_URL`), so a follow-up may reach
  any instance. A Redis failure never fails a request: an id not found
  because Redis is down is looked up on the deployments instead.

Entries expire after `ttl` seconds (`RESPONSE_AFFINITY_TTL`, by default Azure's
30 days of retention). In memory, at most `MAX_MEMORY_ENTRIES` are kept, the
oldest forgotten first (a forgotten id is looked up again when asked for):
30 days of a busy server's responses would otherwise be memory without bound.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.policy.quota import DEFAULT_REDIS_PREFIX, REDIS_CONNECT_TIMEOUT, REDIS_SOCKET_TIMEOUT

_REDIS_FAILURES = (RedisError, OSError, asyncio.TimeoutError)
# About 200 bytes each: some 200 MB at most.
MAX_MEMORY_ENTRIES = 1_000_000


class AffinityStore(Protocol):
    async def owner(self, response_id: str) -> str | None: ...

    async def record(self, response_id: str, deployment: str) -> None: ...

    async def forget(self, response_id: str) -> None: ...

    async def close(self) -> None: ...


class MemoryAffinity:
    """Response ids of this process, oldest first (all entries share one ttl)."""

    def __init__(
        self,
        ttl: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_entries: int = MAX_MEMORY_ENTRIES,
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._owners: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._owners:
            _oldest, (_deployment, expires) = next(iter(self._owners.items()))
            if expires > now:
                return
            self._owners.popitem(last=False)

    async def owner(self, response_id: str) -> str | None:
        now = self._clock()
        self._expire(now)
        entry = self._owners.get(response_id)
        return entry[0] if entry else None

    async def record(self, response_id: str, deployment: str) -> None:
        now = self._clock()
        self._expire(now)
        self._owners.pop(response_id, None)
        self._owners[response_id] = (deployment, now + self.ttl)
        if len(self._owners) > self.max_entries:
            self._owners.popitem(last=False)

    async def forget(self, response_id: str) -> None:
        self._owners.pop(response_id, None)

    async def close(self) -> None:
        return None


class RedisAffinity:
    """Response ids in Redis, `azgw:response:<id>` = deployment name, expiring after `ttl`."""

    def __init__(
        self,
        url: str,
        ttl: float,
        *,
        on_redis_error: Callable[[], None] | None = None,
        prefix: str = DEFAULT_REDIS_PREFIX,
    ) -> None:
        self.ttl = ttl
        self.prefix = prefix
        self._on_redis_error = on_redis_error
        self._redis = aioredis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT,
        )

    def _key(self, response_id: str) -> str:
        return f"{self.prefix}response:{response_id}"

    def _failed(self) -> None:
        if self._on_redis_error is not None:
            self._on_redis_error()

    async def owner(self, response_id: str) -> str | None:
        try:
            owner = await self._redis.get(self._key(response_id))
        except _REDIS_FAILURES:
            self._failed()
            return None
        return owner if isinstance(owner, str) else None

    async def record(self, response_id: str, deployment: str) -> None:
        try:
            await self._redis.set(self._key(response_id), deployment, ex=max(1, int(self.ttl)))
        except _REDIS_FAILURES:
            self._failed()

    async def forget(self, response_id: str) -> None:
        try:
            await self._redis.delete(self._key(response_id))
        except _REDIS_FAILURES:
            self._failed()

    async def close(self) -> None:
        await self._redis.aclose()
