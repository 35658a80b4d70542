"""Sliding-window RPM/TPM limits with a driven clock, in memory and in a real Redis
(the `redis_server` fixture is in conftest.py)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.policy.estimate import Estimate, TokenEstimator
from gateway.policy.limits import (
    Decision,
    KeyLimits,
    MemoryRateLimiter,
    RedisRateLimiter,
)

from .support.clock import Clock

# The start of some minute, far from the present so no real clock matters.
T0 = 29_000_000 * 60.0


def tokens(prompt: int, completion: int = 0, *, explicit: bool = True) -> Estimate:
    return Estimate(prompt, completion, explicit, "characters")


ONE_REQUEST = tokens(0)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest, clock: Clock) -> Any:
    if request.param == "memory":
        return MemoryRateLimiter(clock=clock)
    client = request.getfixturevalue("redis_client")(decode_responses=True)
    return RedisRateLimiter(client, clock=clock)


def assert_no_span_exceeds(admitted: list[float], limit: int) -> None:
    for start in admitted:
        in_span = [t for t in admitted if start <= t < start + 60]
        assert len(in_span) <= limit, f"{len(in_span)} admitted in the 60 s from {start}"


async def drive(limiters: list[Any], limits: KeyLimits, clock: Clock, start: float, end: float):
    """One request every 0.5 s from `start` to `end`, round-robin over `limiters`."""
    admitted: list[float] = []
    step = 0
    while start + step * 0.5 < end:
        clock.now = start + step * 0.5
        decision = await limiters[step % len(limiters)].admit(limits, ONE_REQUEST)
        if decision.allowed:
            admitted.append(clock.now)
        step += 1
    return admitted


@pytest.mark.gen_test
async def test_no_60_s_span_admits_more_than_rpm_across_a_minute_boundary(limiter, clock):
    limits = KeyLimits("alice", rpm=10)
    admitted = await drive([limiter], limits, clock, T0 + 50, T0 + 180)
    assert_no_span_exceeds(admitted, 10)
    # The first ten at 50.0 .. 54.5; the minute turning at 60 frees nothing (a fixed
    # window would have admitted ten more there); the second-50 bucket leaves at 111.
    assert admitted[:10] == [T0 + 50 + i * 0.5 for i in range(10)]
    assert admitted[10] == T0 + 111
    assert len(admitted) == 30


@pytest.mark.gen_test
async def test_two_stores_on_one_redis_share_the_window(redis_client, clock):
    # One client decodes replies, the other returns bytes: both read the script alike.
    first = RedisRateLimiter(redis_client(decode_responses=True), clock=clock)
    second = RedisRateLimiter(redis_client(), clock=clock)
    limits = KeyLimits("shared", rpm=7)
    admitted = await drive([first, second], limits, clock, T0 + 40, T0 + 200)
    assert_no_span_exceeds(admitted, 7)
    assert admitted[:7] == [T0 + 40 + i * 0.5 for i in range(7)]
    assert admitted[7] == T0 + 101


@pytest.mark.gen_test
async def test_a_refusal_says_when_a_request_fits_and_is_not_charged(limiter, clock):
    limits = KeyLimits("alice", rpm=2)
    clock.now = T0 + 10.25
    assert (await limiter.admit(limits, ONE_REQUEST)).allowed
    clock.now = T0 + 20.5
    second = await limiter.admit(limits, ONE_REQUEST)
    assert second.headers == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
    }
    clock.now = T0 + 30
    for _ in range(5):
        refused = await limiter.admit(limits, ONE_REQUEST)
        assert not refused.allowed and refused.charge is None
    error = refused.refusal
    assert error is not None and error.status == 429 and error.code == "rate_limit_exceeded"
    # The second-10 bucket leaves the window at 71: 41 s from 30.
    assert error.headers["Retry-After"] == "41"
    assert error.headers["retry-after-ms"] == "41000"
    assert error.headers["x-ratelimit-remaining-requests"] == "0"
    assert "'alice'" in error.message and "2 requests per minute" in error.message
    clock.now = T0 + 71
    assert (await limiter.admit(limits, ONE_REQUEST)).allowed
    assert not (await limiter.admit(limits, ONE_REQUEST)).allowed


@pytest.mark.gen_test
async def test_a_prompt_estimated_above_tpm_is_refused_for_good(limiter, clock):
    limits = KeyLimits("small", tpm=1000)
    body = {"messages": [{"role": "user", "content": "a" * 15_000}], "max_tokens": 10}
    estimate = TokenEstimator().estimate(body, "chat")
    assert estimate.prompt_tokens >= 5000
    decision = await limiter.admit(limits, estimate)
    error = decision.refusal
    assert error is not None and error.status == 429 and error.code == "tokens_exceed_limit"
    assert f"prompt alone is estimated at {estimate.prompt_tokens} tokens" in error.message
    assert "1000 tokens per minute" in error.message and "No retry will help" in error.message
    assert "Retry-After" not in error.headers and "retry-after-ms" not in error.headers
    # Nothing was charged: the whole minute's tokens are still there.
    small = await limiter.admit(limits, tokens(100, 100))
    assert small.headers["x-ratelimit-remaining-tokens"] == "800"


@pytest.mark.gen_test
async def test_an_explicit_budget_that_cannot_fit_is_refused_a_default_one_is_capped(
    limiter, clock
):
    limits = KeyLimits("small", tpm=1000)
    explicit = await limiter.admit(limits, tokens(600, 600, explicit=True))
    assert explicit.refusal is not None and explicit.refusal.code == "tokens_exceed_limit"
    assert "completion budget of 600 come to 1200 tokens" in explicit.refusal.message
    default = await limiter.admit(limits, tokens(600, 1024, explicit=False))
    assert default.allowed and default.charge is not None and default.charge.tokens == 1000
    assert default.headers["x-ratelimit-remaining-tokens"] == "0"


@pytest.mark.gen_test
async def test_the_estimate_is_corrected_to_real_usage(limiter, clock):
    limits = KeyLimits("alice", rpm=100, tpm=1000)
    clock.now = T0 + 5
    first = await limiter.admit(limits, tokens(300, 400))
    assert first.headers["x-ratelimit-remaining-tokens"] == "300"
    assert first.charge is not None
    clock.now = T0 + 8
    await limiter.correct(first.charge, 120)
    after = await limiter.admit(limits, tokens(100))
    assert after.headers["x-ratelimit-remaining-tokens"] == str(1000 - 120 - 100)
    # More than estimated is charged as well.
    assert after.charge is not None
    await limiter.correct(after.charge, 500)
    refused = await limiter.admit(limits, tokens(400))
    assert refused.refusal is not None and refused.refusal.code == "rate_limit_exceeded"
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - 120 - 500)
    # The tokens leave with the first bucket (second 5) at 66.
    assert refused.refusal.headers["Retry-After"] == "58"


@pytest.mark.gen_test
async def test_a_correction_after_the_window_is_dropped(limiter, clock):
    limits = KeyLimits("alice", tpm=1000)
    clock.now = T0 + 1
    old = await limiter.admit(limits, tokens(100))
    clock.now = T0 + 70
    assert old.charge is not None
    await limiter.correct(old.charge, 900)
    assert (await limiter.admit(limits, tokens(1000))).allowed


@pytest.mark.gen_test
async def test_tpm_slides_too(limiter, clock):
    limits = KeyLimits("alice", tpm=1000)
    for second in range(10):
        clock.now = T0 + 30 + second
        assert (await limiter.admit(limits, tokens(100))).allowed
    clock.now = T0 + 60.5
    refused = await limiter.admit(limits, tokens(250))
    # 250 fit once the buckets of seconds 30, 31 and 32 have gone: at 93.
    assert refused.refusal is not None
    assert refused.refusal.headers["retry-after-ms"] == str(int((93 - 60.5) * 1000))
    assert refused.refusal.headers["Retry-After"] == "33"
    clock.now = T0 + 93
    assert (await limiter.admit(limits, tokens(250))).allowed


@pytest.mark.gen_test
async def test_keys_are_counted_apart_and_unlimited_keys_pass(limiter, clock):
    alice, bob = KeyLimits("alice", rpm=1), KeyLimits("bob", rpm=1)
    assert (await limiter.admit(alice, ONE_REQUEST)).allowed
    assert not (await limiter.admit(alice, ONE_REQUEST)).allowed
    assert (await limiter.admit(bob, ONE_REQUEST)).allowed
    for _ in range(20):
        assert await limiter.admit(KeyLimits("free"), tokens(10**9)) == Decision()
