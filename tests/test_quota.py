"""Per-key admission and usage, in memory and in a real Redis started for each test
(the `start_redis` and `redis_server` fixtures are in conftest.py): the store
that puts budgets and the sliding-window limits behind one Redis error policy.
The windows' own arithmetic is tested in test_limits.py, budgets in test_budgets.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.errors import GatewayError
from gateway.policy.budgets import TokenUsage
from gateway.policy.estimate import Estimate
from gateway.policy.keys import CallerKey
from gateway.policy.limits import WINDOW_BUCKETS
from gateway.policy.quota import ANONYMOUS, MemoryQuota, RedisQuota, redacted_redis_url
from gateway.secret import Secret

from .support.clock import Clock

# The start of some minute, far in the future: no real clock matters, and Redis
# does not expire the budgets' counters of its day at once.
T0 = 69_000_000 * 60.0


def estimate(prompt: int = 0, completion: int = 0) -> Estimate:
    return Estimate(prompt, completion, True, "characters")


ONE = estimate()


def used(prompt: int, completion: int) -> TokenUsage:
    return TokenUsage(input_tokens=prompt, output_tokens=completion)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0 + 12.5)


@pytest.fixture
def close_after(io_loop: Any):
    """Register quota stores to be closed after the test, on the test's loop."""
    stores: list[Any] = []
    yield stores.append
    for store in stores:
        io_loop.run_sync(store.close)


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest, close_after: Callable[[Any], None], clock: Clock) -> Any:
    if request.param == "memory":
        quota: Any = MemoryQuota(clock=clock)
    else:
        quota = RedisQuota(request.getfixturevalue("redis_server").url, "closed", clock=clock)
    close_after(quota)
    return quota


def caller(name: str = "alice", **limits: Any) -> CallerKey:
    return CallerKey(name=name, key=Secret(f"sk-{name}-secret-value"), **limits)


@pytest.mark.gen_test
async def test_rpm_admits_exactly_rpm_then_refuses_until_the_window_slides(store, clock):
    key = caller(rpm=5)
    results = [await store.admit(key, ONE) for _ in range(8)]
    assert [result.allowed for result in results] == [True] * 5 + [False] * 3
    assert [r.headers["x-ratelimit-remaining-requests"] for r in results[:5]] == [
        "4", "3", "2", "1", "0",
    ]  # fmt: skip
    assert all(r.headers["x-ratelimit-limit-requests"] == "5" for r in results)
    assert "x-ratelimit-limit-tokens" not in results[0].headers
    assert results[0].refusal is None and results[0].charge is None
    refused = results[5]
    assert refused.limit == "requests" and refused.refusal is not None
    assert refused.refusal.headers["Retry-After"] == "61"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"

    # The minute turning frees nothing; the admitted second leaving the window does.
    clock.now = T0 + 60
    assert not (await store.admit(key, ONE)).allowed
    clock.now = T0 + 12 + WINDOW_BUCKETS
    following = await store.admit(key, ONE)
    assert following.allowed and following.headers["x-ratelimit-remaining-requests"] == "4"


@pytest.mark.gen_test
async def test_refused_requests_are_not_counted(store):
    key = caller(rpm=2, tpm=10)
    first = await store.admit(key, estimate(8, 2))
    assert first.allowed and first.charge is not None
    for _ in range(5):
        refused = await store.admit(key, estimate(1))
        assert not refused.allowed and refused.limit == "tokens"
        # However many refusals, one of the two requests is still left.
        assert refused.headers["x-ratelimit-remaining-requests"] == "1"


@pytest.mark.gen_test
async def test_keys_are_limited_separately_and_unlimited_keys_always_pass(store):
    alice, bob, free = caller("alice", rpm=1), caller("bob", rpm=1), caller("free")
    assert (await store.admit(alice, ONE)).allowed
    assert not (await store.admit(alice, ONE)).allowed
    assert (await store.admit(bob, ONE)).allowed
    for _ in range(20):
        admission = await store.admit(free, estimate(10**6))
        assert admission.allowed and admission.headers == {} and admission.limit is None


@pytest.mark.gen_test
async def test_tpm_charges_the_estimate_and_record_usage_corrects_it(store):
    key = caller(tpm=100)
    first = await store.admit(key, estimate(30, 50))
    assert first.allowed and first.headers == {
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "20",
    }
    assert not (await store.admit(key, estimate(30))).allowed
    # Azure counted 10 + 5: the charge of 80 becomes 15.
    await store.record_usage(key.name, key, "gpt-4o", used(10, 5), 0.0, first.charge)
    second = await store.admit(key, estimate(30, 50))
    assert second.allowed and second.headers["x-ratelimit-remaining-tokens"] == "5"


@pytest.mark.gen_test
async def test_rpm_and_tpm_together(store):
    key = caller(rpm=3, tpm=50)
    admitted = await store.admit(key, estimate(40, 10))
    assert admitted.headers == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "2",
        "x-ratelimit-limit-tokens": "50",
        "x-ratelimit-remaining-tokens": "0",
    }
    refused = await store.admit(key, estimate(1))
    assert not refused.allowed and refused.limit == "tokens"
    # A token refusal does not use up a request.
    assert refused.headers["x-ratelimit-remaining-requests"] == "2"


@pytest.mark.gen_test
async def test_a_used_up_budget_refuses_before_the_window_charges(store):
    key = caller(rpm=10, tokens_per_day=100)
    admitted = await store.admit(key, ONE)
    await store.record_usage(key.name, key, "gpt-4o", used(60, 40), 0.0, admitted.charge)
    refused = await store.admit(key, ONE)
    assert refused.limit == "budget" and refused.refusal is not None
    assert refused.refusal.code == "budget_exceeded"
    assert "resets at" in refused.refusal.message
    # The refusal charged nothing: the window still holds the one request.
    assert refused.headers == {}
    other = await store.admit(caller("bob", rpm=10), ONE)
    assert other.allowed


@pytest.mark.gen_test
async def test_usage_report_after_known_usage(store):
    alice = caller("alice", tpm=1000)
    odd = caller('team:a "x"')
    await store.record_usage("alice", alice, "gpt-4o", used(10, 5), 0.25)
    await store.record_usage("alice", alice, "gpt-4o", used(7, 3), 0.5)
    await store.record_usage("alice", alice, "gpt-4o-mini", used(1, 2), 0.0)
    await store.record_usage(odd.name, odd, "gpt-4o", used(4, 0), 0.0)
    await store.record_usage(ANONYMOUS, None, "gpt-4o", used(100, 50), 0.0)
    assert await store.usage_report() == {
        "keys": {
            "alice": {
                "gpt-4o": {
                    "requests": 2, "prompt_tokens": 17, "completion_tokens": 8, "cost_usd": 0.75,
                },
                "gpt-4o-mini": {
                    "requests": 1, "prompt_tokens": 1, "completion_tokens": 2, "cost_usd": 0.0,
                },
            },
            "anonymous": {
                "gpt-4o": {
                    "requests": 1, "prompt_tokens": 100, "completion_tokens": 50, "cost_usd": 0.0,
                },
            },
            'team:a "x"': {
                "gpt-4o": {
                    "requests": 1, "prompt_tokens": 4, "completion_tokens": 0, "cost_usd": 0.0,
                },
            },
        }
    }  # fmt: skip


@pytest.mark.gen_test
async def test_empty_usage_report(store):
    assert await store.usage_report() == {"keys": {}}


@pytest.mark.gen_test
async def test_redis_keys_are_prefixed_and_expire(redis_server, close_after, clock):
    quota = RedisQuota(redis_server.url, "closed", prefix="test:", clock=clock)
    close_after(quota)
    key = caller(rpm=2, tpm=100, tokens_per_day=1000)
    for _ in range(5):
        admission = await quota.admit(key, estimate(1, 1))
    await quota.record_usage(key.name, key, "gpt-4o", used(1, 1), 0.0)
    raw = aioredis.Redis.from_url(redis_server.url)
    try:
        # The three refused requests were not charged.
        assert await raw.hgetall("test:window:requests:alice") == {b"%d" % int(clock.now): b"2"}
        assert await raw.hgetall("test:window:tokens:alice") == {b"%d" % int(clock.now): b"4"}
        for name in ("test:window:requests:alice", "test:window:tokens:alice"):
            assert 0 < await raw.ttl(name) <= WINDOW_BUCKETS + 1
        assert all(name.startswith(b"test:") for name in await raw.keys("*"))
        assert await raw.ttl("test:budget:tokens:2101-03-11:alice") > 0
    finally:
        await raw.aclose()
    assert not admission.allowed


@pytest.mark.gen_test(timeout=30)
async def test_two_processes_sharing_redis_never_over_admit(redis_server, close_after):
    first = RedisQuota(redis_server.url, "closed")
    second = RedisQuota(redis_server.url, "closed")
    close_after(first)
    close_after(second)
    key = caller(rpm=37)
    results = await asyncio.gather(
        *((first if index % 2 else second).admit(key, ONE) for index in range(300))
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
    assert (await quota.admit(key, ONE)).headers["x-ratelimit-remaining-requests"] == "1"
    assert errors == []

    server.stop()
    for _ in range(4):
        admission = await quota.admit(key, ONE)
        assert admission.allowed and admission.limit is None
    await quota.record_usage(key.name, key, "gpt-4o", used(1, 1), 0.0)
    assert len(errors) == 5

    records = quota_log_records(caplog)
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    message = records[0].getMessage()
    assert f"redis://127.0.0.1:{server.port}/0" in message and "admitting" in message
    assert password not in caplog.text and "sk-alice-secret-value" not in caplog.text

    # Back on the same port (empty: nothing is persisted), requests are counted again.
    server.start()
    assert (await quota.admit(key, ONE)).headers["x-ratelimit-remaining-requests"] == "1"
    assert (await quota.admit(key, ONE)).headers["x-ratelimit-remaining-requests"] == "0"
    assert not (await quota.admit(key, ONE)).allowed
    assert len(errors) == 5


@pytest.mark.gen_test(timeout=30)
async def test_redis_down_fails_closed_with_503(redis_server, close_after, caplog):
    caplog.set_level(logging.DEBUG)
    errors: list[None] = []
    quota = RedisQuota(redis_server.url, "closed", on_redis_error=lambda: errors.append(None))
    close_after(quota)
    key = caller(rpm=10)
    assert (await quota.admit(key, ONE)).allowed

    redis_server.stop()
    for _ in range(3):
        with pytest.raises(GatewayError) as caught:
            await quota.admit(key, ONE)
        assert caught.value.status == 503 and caught.value.code == "quota_unavailable"
    # After Azure answered there is nothing to refuse: recording never raises.
    await quota.record_usage(key.name, key, "gpt-4o", used(1, 1), 0.0)
    with pytest.raises(GatewayError) as caught:
        await quota.usage_report()
    assert caught.value.status == 503
    # A key without limits needs no Redis at all.
    assert (await quota.admit(caller("free"), ONE)).allowed
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
