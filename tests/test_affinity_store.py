"""The response-affinity stores: in memory (expiry, bound) and in a real Redis."""

from __future__ import annotations

import pytest

from gateway.policy.affinity import MemoryAffinity, RedisAffinity

from .conftest import free_port
from .support.clock import Clock


@pytest.mark.gen_test
async def test_memory_entries_expire_after_the_ttl():
    clock = Clock()
    store = MemoryAffinity(60, clock=clock)
    await store.record("resp_a", "east")
    clock.now += 30
    await store.record("resp_b", "west")
    assert await store.owner("resp_a") == "east"
    clock.now += 31
    assert await store.owner("resp_a") is None
    assert await store.owner("resp_b") == "west"
    await store.forget("resp_b")
    assert await store.owner("resp_b") is None


@pytest.mark.gen_test
async def test_memory_keeps_at_most_its_bound_the_oldest_forgotten():
    store = MemoryAffinity(3600, max_entries=2)
    for number in range(3):
        await store.record(f"resp_{number}", "east")
    assert [await store.owner(f"resp_{n}") for n in range(3)] == [None, "east", "east"]


@pytest.mark.gen_test
async def test_redis_keeps_entries_with_their_ttl(redis_server):
    store = RedisAffinity(redis_server.url, 120)
    try:
        await store.record("resp_r", "west")
        assert await store.owner("resp_r") == "west"
        assert 0 < await store._redis.ttl("azgw:response:resp_r") <= 120
        await store.forget("resp_r")
        assert await store.owner("resp_r") is None
    finally:
        await store.close()


@pytest.mark.gen_test
async def test_a_redis_that_is_down_knows_nothing_and_fails_nothing():
    failures = []
    store = RedisAffinity(
        f"redis://127.0.0.1:{free_port()}/0", 120, on_redis_error=lambda: failures.append(1)
    )
    try:
        await store.record("resp_x", "east")
        assert await store.owner("resp_x") is None
        await store.forget("resp_x")
    finally:
        await store.close()
    assert len(failures) == 3
