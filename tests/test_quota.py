"""Per-key limits and usage, in memory and in a real Redis started for each test
(the `start_redis` and `redis_server` fixtures are in conftest.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.errors import GatewayError
from gateway.policy.keys import CallerKey
from gateway.policy.quota import (
    ANONYMOUS,
    COUNTER_TTL_SECONDS,
    MemoryQuota,
    RedisQuota,
    redacted_redis_url,
    window_of,
)
from gateway.secret import Secret

# The start of some minute, far from the present so no real clock matters.
T0 = 29_000_000 * 60.0


@pytest.fixture
def close_after(io_loop: Any):
    """Register quota stores to be closed after the test, on the test's loop."""
    stores: list[Any] = []
    yield stores.append
    for store in stores:
        io_loop.run_sync(store.close)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, close_after: Callable[[Any], None]) -> Any:
    if request.param == "memory":
        quota: Any = MemoryQuota()
    else:
        quota = RedisQuota(request.getfixturevalue("redis_server").url, "closed")
    close_after(quota)
    return quota


def caller(name: str = "alice", **limits: Any) -> CallerKey:
    return CallerKey(name=name, key=Secret(f"sk-{name}-secret-value"), **limits)


@pytest.mark.gen_test
async def test_rpm_admits_exactly_rpm_then_refuses_until_the_next_minute(store):
    key = caller(rpm=5)
    now = T0 + 12.5
    results = [await store.admit(key, now=now) for _ in range(8)]
    assert [result.allowed for result in results] == [True] * 5 + [False] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in results[:5]] == [
        "4", "3", "2", "1", "0",
    ]  # fmt: skip
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in results)
    assert "x-ratelimit-limit-tokens" not in results[0].headers
    assert "Retry-After" not in results[0].headers and results[0].retry_after == 0
    refused = results[5]
    assert refused.limit == "requests"
    assert refused.retry_after == 48 and refused.headers["Retry-After"] == "48"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"

    late = await store.admit(key, now=T0 + 59.9)
    assert not late.allowed and late.retry_after == 1
    following = await store.admit(key, now=T0 + 60)
    assert following.allowed and following.headers["x-ratelimit-remaining-requests"] == "4"


@pytest.mark.gen_test
async def test_refused_requests_are_not_counted(store):
    key = caller(rpm=2, tpm=10)
    assert (await store.admit(key, now=T0)).allowed
    await store.record_usage(key.name, key, "gpt-4o", 8, 2, now=T0)
    for _ in range(5):
        refused = await store.admit(key, now=T0 + 1)
        assert not refused.allowed and refused.limit == "tokens"
        # However many refusals, one of the two requests is still left.
        assert refused.headers["x-ratelimit-remaining-requests"] == "1"


@pytest.mark.gen_test
async def test_keys_are_limited_separately_and_unlimited_keys_always_pass(store):
    alice, bob, free = caller("alice", rpm=1), caller("bob", rpm=1), caller("free")
    assert (await store.admit(alice, now=T0)).allowed
    assert not (await store.admit(alice, now=T0)).allowed
    assert (await store.admit(bob, now=T0)).allowed
    for _ in range(20):
        admission = await store.admit(free, now=T0)
        assert admission.allowed and admission.headers == {} and admission.limit is None


@pytest.mark.gen_test
async def test_tpm_admits_while_used_is_below_the_limit(store):
    key = caller(tpm=100)
    first = await store.admit(key, now=T0 + 1)
    assert first.allowed
    assert first.headers == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "100",
    }
    await store.record_usage(key.name, key, "gpt-4o", 60, 30, now=T0 + 2)
    second = await store.admit(key, now=T0 + 3)
    assert second.allowed and second.headers["x-ratelimit-remaining-tokens"] == "10"
    # This answer crosses the limit: it was admitted, the next ones are not.
    await store.record_usage(key.name, key, "gpt-4o", 15, 5, now=T0 + 4)
    for moment in (T0 + 5, T0 + 30, T0 + 59):
        refused = await store.admit(key, now=moment)
        assert not refused.allowed and refused.limit == "tokens"
        assert refused.retry_after == 60 - (moment - T0)
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    renewed = await store.admit(key, now=T0 + 60)
    assert renewed.allowed and renewed.headers["x-ratelimit-remaining-tokens"] == "100"


@pytest.mark.gen_test
async def test_rpm_and_tpm_together(store):
    key = caller(rpm=3, tpm=50)
    admitted = await store.admit(key, now=T0)
    assert admitted.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-limit-tokens": "50",
        "x-ratelimit-remaining-tokens": "50",
    }
    await store.record_usage(key.name, key, "gpt-4o", 40, 10, now=T0)
    refused = await store.admit(key, now=T0 + 1)
    assert not refused.allowed and refused.limit == "tokens"
    # A token refusal does not use up a request.
    assert refused.headers["x-ratelimit-remaining-requests"] == "2"


@pytest.mark.gen_test
async def test_usage_report_after_known_usage(store):
    alice = caller("alice", tpm=1000)
    odd = caller('team:a "x"')
    await store.record_usage("alice", alice, "gpt-4o", 10, 5, now=T0)
    await store.record_usage("alice", alice, "gpt-4o", 7, 3, now=T0 + 61)
    await store.record_usage("alice", alice, "gpt-4o-mini", 1, 2, now=T0)
    await store.record_usage(odd.name, odd, "gpt-4o", 4, 0, now=T0)
    await store.record_usage(ANONYMOUS, None, "gpt-4o", 100, 50, now=T0)
    assert await store.usage_report() == {
        "keys": {
            "alice": {
                "gpt-4o": {"requests": 2, "prompt_tokens": 17, "completion_tokens": 8},
                "gpt-4o-mini": {"requests": 1, "prompt_tokens": 1, "completion_tokens": 2},
            },
            "anonymous": {
                "gpt-4o": {"requests": 1, "prompt_tokens": 100, "completion_tokens": 50},
            },
            'team:a "x"': {
                "gpt-4o": {"requests": 1, "prompt_tokens": 4, "completion_tokens": 0},
            },
        }
    }


@pytest.mark.gen_test
async def test_empty_usage_report(store):
    assert await store.usage_report() == {"keys": {}}


@pytest.mark.gen_test
async def test_memory_counters_of_old_windows_are_dropped():
    quota = MemoryQuota()
    key = caller(rpm=1, tpm=10)
    await quota.admit(key, now=T0)
    await quota.record_usage(key.name, key, "gpt-4o", 5, 5, now=T0)
    await quota.admit(key, now=T0 + 60)
    assert {window for _, window in quota._requests} == {window_of(T0), window_of(T0) + 1}
    await quota.admit(key, now=T0 + 120)
    assert {window for _, window in quota._requests} == {window_of(T0) + 1, window_of(T0) + 2}
    assert all(window > window_of(T0) for _, window in quota._tokens)


@pytest.mark.gen_test
async def test_redis_counters_are_prefixed_exact_and_expire_after_two_minutes(
    redis_server, close_after
):
    quota = RedisQuota(redis_server.url, "closed", prefix="test:")
    close_after(quota)
    key = caller(rpm=2, tpm=100)
    for _ in range(5):
        await quota.admit(key, now=T0)
    await quota.record_usage(key.name, key, "gpt-4o", 1, 1, now=T0)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        window = window_of(T0)
        # The three refused requests were not counted.
        assert await raw.get(f"test:requests:alice:{window}") == b"2"
        assert await raw.get(f"test:tokens:alice:{window}") == b"2"
        for name in (f"test:requests:alice:{window}", f"test:tokens:alice:{window}"):
            assert 0 < await raw.ttl(name) <= COUNTER_TTL_SECONDS
        assert all(name.startswith(b"test:") for name in await raw.keys("*"))
    finally:
        await raw.aclose()


@pytest.mark.gen_test(timeout=30)
async def test_two_processes_sharing_redis_never_over_admit(redis_server, close_after):
    first = RedisQuota(redis_server.url, "closed")
    second = RedisQuota(redis_server.url, "closed")
    close_after(first)
    close_after(second)
    key = caller(rpm=37)
    results = await asyncio.gather(
        *((first if index % 2 else second).admit(key, now=T0 + 5) for index in range(300))
    )
    admitted = [result for result in results if result.allowed]
    assert len(admitted) == 37
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in admitted)
    assert remaining == list(range(37))
    assert all(r.limit == "requests" for r in results if not r.allowed)


QUOTA_LOGGER = "azure-gpt-api.quota"


def quota_log_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.name == QUOTA_LOGGER]


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_fails_open_counts_and_logs_once(start_redis, close_after, caplog):
    caplog.set_level(logging.DEBUG)
    password = "redis-pw-7c1e9b"
    server = start_redis(password=password)
    errors: list[None] = []
    quota = RedisQuota(server.url, "open", on_redis_error=lambda: errors.append(None))
    close_after(quota)
    key = caller(rpm=2)
    assert (await quota.admit(key, now=T0)).headers["x-ratelimit-remaining-requests"] == "1"
    assert errors == []

    server.stop()
    for _ in range(4):
        admission = await quota.admit(key, now=T0)
        assert admission.allowed and admission.limit is None
    await quota.record_usage(key.name, key, "gpt-4o", 1, 1, now=T0)
    assert len(errors) == 5

    records = quota_log_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert f"redis://127.0.0.1:{server.port}/0" in message and "admitting" in message
    assert password not in caplog.text and "sk-alice-secret-value" not in caplog.text

    # Back on the same port (empty: nothing is persisted), requests are counted again.
    server.start()
    assert (await quota.admit(key, now=T0)).headers["x-ratelimit-remaining-requests"] == "1"
    assert (await quota.admit(key, now=T0)).headers["x-ratelimit-remaining-requests"] == "0"
    assert not (await quota.admit(key, now=T0)).allowed
    assert len(errors) == 5


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_fails_closed_with_503(redis_server, close_after, caplog):
    caplog.set_level(logging.DEBUG)
    errors: list[None] = []
    quota = RedisQuota(redis_server.url, "closed", on_redis_error=lambda: errors.append(None))
    close_after(quota)
    key = caller(rpm=10)
    assert (await quota.admit(key, now=T0)).allowed

    redis_server.stop()
    for _ in range(3):
        with pytest.raises(GatewayError) as caught:
            await quota.admit(key, now=T0)
        assert caught.value.status == 503 and caught.value.code == "quota_unavailable"
    # After Azure answered there is nothing to refuse: recording never raises.
    await quota.record_usage(key.name, key, "gpt-4o", 1, 1, now=T0)
    with pytest.raises(GatewayError) as caught:
        await quota.usage_report()
    assert caught.value.status == 503
    # A key without limits needs no Redis at all.
    assert (await quota.admit(caller("free"), now=T0)).allowed
    assert len(errors) == 5
    records = quota_log_records(caplog)
    assert len(records) == 1 and "refusing" in records[0].getMessage()


def test_on_error_must_be_open_or_closed():
    with pytest.raises(ValueError):
        RedisQuota("redis://127.0.0.1:1/0", "sometimes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url, shown",
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:s3cret@cache.internal:6380/2", "redis://cache.internal:6380/2"),
        ("rediss://user:s3cret@cache.internal/1?password=s3cret", "rediss://cache.internal/1"),
    ],
)
def test_redacted_redis_url(url, shown):
    assert redacted_redis_url(url) == shown
