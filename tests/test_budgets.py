"""Per-key day and month budgets with a driven clock, in memory and in a real Redis, and the
cost of an answer's usage at a deployment's prices."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from gateway.errors import ConfigError
from gateway.policy.budgets import (
    Budget,
    MemoryBudgets,
    Price,
    RedisBudgets,
    Spent,
    TokenUsage,
    cost_usd,
    periods,
)
from gateway.policy.deployments import schema_problems
from gateway.policy.keys import keys_from_yaml

from .support.clock import Clock


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.fixture
def clock() -> Clock:
    return Clock(at("2031-01-31T22:00:00"))


@pytest.fixture(params=["memory", "redis"])
def budgets(request: pytest.FixtureRequest, clock: Clock) -> Any:
    if request.param == "memory":
        return MemoryBudgets(clock=clock)
    return RedisBudgets(request.getfixturevalue("redis_client")(), clock=clock)


PRICE = Price(input_per_1m=2.5, output_per_1m=10.0, cached_input_per_1m=1.25)


# --- usage and cost -------------------------------------------------------------


def test_usage_from_chat_responses_and_embeddings():
    chat = {
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "total_tokens": 1200,
        "prompt_tokens_details": {"cached_tokens": 600},
    }
    assert TokenUsage.from_usage(chat) == TokenUsage(1000, 600, 200)
    responses = {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 64},
        "total_tokens": 123,
    }
    assert TokenUsage.from_usage(responses) == TokenUsage(36, 0, 87)
    assert TokenUsage.from_usage({"prompt_tokens": 8, "total_tokens": 8}).total == 8
    # Azure sometimes leaves details out or sends null; nothing odd is counted.
    assert TokenUsage.from_usage({"input_tokens": 20, "output_tokens": 11}) == TokenUsage(20, 0, 11)
    assert TokenUsage.from_usage(None) == TokenUsage()
    odd = {"prompt_tokens": "5", "completion_tokens": -1, "prompt_tokens_details": None}
    assert TokenUsage.from_usage(odd) == TokenUsage()
    assert TokenUsage.from_usage(
        {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 99}}
    ) == TokenUsage(10, 10, 0)


def test_cost_prices_cached_input_apart():
    usage = TokenUsage(input_tokens=1_000_000, cached_input_tokens=400_000, output_tokens=100_000)
    assert cost_usd(usage, PRICE) == pytest.approx(0.6 * 2.5 + 0.4 * 1.25 + 0.1 * 10.0)
    no_cache_price = Price(input_per_1m=2.5, output_per_1m=10.0)
    assert cost_usd(usage, no_cache_price) == pytest.approx(2.5 + 1.0)
    assert cost_usd(usage, None) == 0.0


def test_periods_are_utc_calendar_days_and_months():
    day, month = periods(at("2031-12-31T23:59:59"))
    assert (day.id, month.id) == ("2031-12-31", "2031-12")
    assert day.ends == month.ends == datetime(2032, 1, 1, tzinfo=UTC)
    day, month = periods(at("2032-02-29T00:00:00"))
    assert (day.id, month.id) == ("2032-02-29", "2032-02")
    assert month.ends == datetime(2032, 3, 1, tzinfo=UTC)


# --- budgets ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_a_day_budget_refuses_at_the_limit_and_resets_at_midnight(budgets, clock):
    budget = Budget("alice", tokens_per_day=1000)
    clock.now = at("2031-01-15T09:00:00")
    assert await budgets.check(budget) is None
    await budgets.record("alice", 600, 0.0)
    assert await budgets.check(budget) is None
    await budgets.record("alice", 400, 0.0)
    clock.now = at("2031-01-15T23:59:59.5")
    refusal = await budgets.check(budget)
    assert refusal is not None and refusal.status == 429 and refusal.code == "budget_exceeded"
    assert "'alice'" in refusal.message and "tokens_per_day budget (1000 tokens a day)" in (
        refusal.message
    )
    assert "resets at 2031-01-16T00:00:00Z" in refusal.message
    assert refusal.headers == {"Retry-After": "1", "retry-after-ms": "500"}
    clock.now = at("2031-01-16T00:00:00")
    assert await budgets.check(budget) is None
    assert await budgets.spent("alice") == Spent(0, 1000, 0.0)
    # Other keys were never affected.
    assert await budgets.check(Budget("bob", tokens_per_day=1000)) is None


@pytest.mark.gen_test
async def test_a_cost_budget_refuses_at_the_limit_and_resets_on_the_first(budgets, clock):
    budget = Budget("team", usd_per_month=5.0)
    clock.now = at("2031-01-31T10:00:00")
    usage = TokenUsage(input_tokens=1_000_000, cached_input_tokens=0, output_tokens=250_000)
    cost = cost_usd(usage, PRICE)
    assert cost == pytest.approx(5.0)
    await budgets.record("team", usage.total, cost / 2)
    assert await budgets.check(budget) is None
    await budgets.record("team", usage.total, cost / 2)
    refusal = await budgets.check(budget)
    assert refusal is not None and "usd_per_month budget (US$5 a month)" in refusal.message
    assert "resets at 2031-02-01T00:00:00Z" in refusal.message
    assert refusal.headers["Retry-After"] == str(14 * 3600)
    spent = await budgets.spent("team")
    assert spent.usd_this_month == pytest.approx(5.0)
    assert spent.tokens_this_month == 2 * usage.total
    clock.now = at("2031-02-01T00:00:00")
    assert await budgets.check(budget) is None
    assert await budgets.spent("team") == Spent()


@pytest.mark.gen_test
async def test_the_latest_reset_is_the_one_reported(budgets, clock):
    budget = Budget("alice", tokens_per_day=100, tokens_per_month=150)
    clock.now = at("2031-03-10T12:00:00")
    await budgets.record("alice", 150, 0.0)
    refusal = await budgets.check(budget)
    assert refusal is not None and "tokens_per_month" in refusal.message
    assert "resets at 2031-04-01T00:00:00Z" in refusal.message
    # The next day the day budget is fresh, the month's still used up.
    clock.now = at("2031-03-11T00:00:01")
    refusal = await budgets.check(budget)
    assert refusal is not None and "tokens_per_month" in refusal.message


@pytest.mark.gen_test
async def test_a_key_without_budgets_is_never_refused(budgets):
    await budgets.record("free", 10**9, 10**6)
    assert await budgets.check(Budget("free")) is None


@pytest.mark.gen_test
async def test_processes_sharing_redis_share_budgets(redis_client, clock):
    first = RedisBudgets(redis_client(), clock=clock)
    second = RedisBudgets(redis_client(decode_responses=True), clock=clock)
    budget = Budget("shared", tokens_per_day=100)
    await first.record("shared", 60, 0.25)
    await second.record("shared", 40, 0.5)
    assert await first.spent("shared") == Spent(100, 100, 0.75)
    assert (await second.check(budget)) is not None


@pytest.mark.gen_test
async def test_redis_counters_expire_a_day_after_their_period(redis_client, clock):
    client = redis_client()
    store = RedisBudgets(client, clock=clock)
    clock.now = at("2031-01-31T22:00:00")
    await store.record("alice", 5, 0.01)
    expiries = {
        key.decode(): await client.expiretime(key) for key in await client.keys("azgw:budget:*")
    }
    next_day = int(at("2031-02-02T00:00:00"))
    assert expiries == {
        "azgw:budget:tokens:2031-01-31:alice": next_day,
        "azgw:budget:tokens:2031-01:alice": next_day,
        "azgw:budget:usd:2031-01:alice": next_day,
    }


# --- configuration --------------------------------------------------------------


def test_budget_and_price_from_configuration():
    assert Budget.from_config("alice", {"name": "alice", "key": "k", "usd_per_month": 20}) == (
        Budget("alice", usd_per_month=20.0)
    )
    assert Budget.from_config("bob", {"tokens_per_day": 10, "tokens_per_month": 300}) == Budget(
        "bob", tokens_per_day=10, tokens_per_month=300
    )
    assert Price.from_config({"input_per_1m": 2, "output_per_1m": 8}) == Price(2.0, 8.0, None)


def test_the_keys_schema_takes_budgets_and_checks_them():
    keys = keys_from_yaml(
        [{"name": "a", "key": "sk-a", "tokens_per_day": 1000, "usd_per_month": 12.5}], {}
    )
    assert [key.name for key in keys] == ["a"]
    with pytest.raises(ConfigError) as raised:
        keys_from_yaml([{"name": "a", "key": "sk-a", "tokens_per_month": 0}], {})
    assert [problem.split(":")[0] for problem in raised.value.problems] == [
        "DEPLOYMENTS_FILE keys[0] (a).tokens_per_month"
    ]


def test_the_deployments_schema_takes_priority_and_price():
    entry = {
        "name": "ptu",
        "endpoint": "https://ptu.example",
        "deployment": "gpt-4o",
        "api_version": "v1",
        "key": "k",
        "priority": 1,
        "price": {"input_per_1m": 2.5, "output_per_1m": 10, "cached_input_per_1m": 1.25},
    }
    assert schema_problems({"deployments": [entry]}, "deployments.schema.json", "F") == []
    bad = {**entry, "priority": 0, "price": {"input_per_1m": -1}}
    problems = schema_problems({"deployments": [bad]}, "deployments.schema.json", "F")
    assert len(problems) == 3
    assert all(problem.startswith("F deployments[0] (ptu).") for problem in problems)
    assert any(".priority" in problem for problem in problems)
    assert any(".price" in problem and "output_per_1m" in problem for problem in problems)
