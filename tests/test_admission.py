"""Admission end to end: sliding-window limits across a minute boundary (one gateway, and two
sharing a Redis), budgets refused at the limit and reset at the boundary, and the cost
in /v1/usage and /metrics. Real sockets, the emulator (one token a word), driven clocks."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from .conftest import API_VERSION, DEPLOYMENT, RunningGateway
from .support.bodies import chat
from .support.clock import Clock
from .support.deployments import write_deployments_file
from .support.metrics import sample, samples

LIMITED_KEY = "sk-limited-4e1f0a9c2b"
ADMIN_KEY = "sk-admin-0c7d2e9f41"
# 23:59:50 on the last day of a month, far in the future (Redis expires nothing at once).
MONTH_END = datetime(2101, 3, 31, 23, 59, 50, tzinfo=UTC).timestamp()
NEXT_MONTH = datetime(2101, 4, 1, tzinfo=UTC).timestamp()
# A minute's start, 40 s before which the rpm tests begin.
T0 = 69_000_000 * 60.0


def auth(key: str) -> dict[str, str]:
    return {"api-key": key}


def deployments_file(tmp_path: Path, emulator_url: str, key: dict[str, Any], **extra: Any) -> str:
    entry = {
        "name": "gpt-4o", "endpoint": emulator_url, "deployment": DEPLOYMENT,
        "api_version": API_VERSION, "key": "${KEY}", "models": ["gpt-4o"], **extra,
    }  # fmt: skip
    admin = {"name": "admin", "key": ADMIN_KEY, "admin": True}
    return write_deployments_file(tmp_path, [entry], [{"key": LIMITED_KEY, **key}, admin])


def most_in_any_minute(times: list[float]) -> int:
    """The most of `times` that any 60-second span holds."""
    return max(sum(1 for t in times if start <= t < start + 60) for start in times)


async def drive_through_a_minute_boundary(
    clock: Clock, gateways: list[RunningGateway], rpm: int
) -> list[float]:
    """Two requests every 5 s from 40 s before a minute's end to 2 minutes after, alternating
    between `gateways`; the clock times of those admitted."""
    admitted: list[float] = []
    sent = 0
    for step in range(33):
        clock.now = T0 - 40 + 5 * step
        for _ in range(2):
            gateway = gateways[sent % len(gateways)]
            sent += 1
            response = await gateway.post(
                "/v1/gpt/chat", {"prompt": "tick"}, headers=auth(LIMITED_KEY)
            )
            assert response.code in (200, 429), response.body
            assert response.headers["x-ratelimit-limit-requests"] == str(rpm)
            if response.code == 200:
                admitted.append(clock.now)
            else:
                assert 1 <= int(response.headers["Retry-After"]) <= 61
    return admitted


@pytest.mark.gen_test(timeout=60)
async def test_no_60_second_span_admits_more_than_rpm_across_a_minute_boundary(
    start_gateway: Callable[..., RunningGateway], tmp_path: Path, emulator: Any
):
    clock = Clock(T0)
    file = deployments_file(tmp_path, emulator.url, {"name": "limited", "rpm": 5})
    gateway = start_gateway(clock=clock, DEPLOYMENTS_FILE=file, MAX_ATTEMPTS="1")
    admitted = await drive_through_a_minute_boundary(clock, [gateway], 5)
    assert most_in_any_minute(admitted) == 5
    # The five before the boundary hold off the ones after it until they leave the
    # window (61 s after their second: T0 + 21, and the next step is T0 + 25).
    assert admitted[:6] == [T0 - 40] * 2 + [T0 - 35] * 2 + [T0 - 30, T0 + 25]
    assert len(emulator.requests) == len(admitted)


@pytest.mark.gen_test(timeout=60)
async def test_two_gateways_on_one_redis_never_admit_more_than_rpm_between_them(
    start_gateway: Callable[..., RunningGateway],
    tmp_path: Path,
    emulator: Any,
    redis_server: Any,
):
    clock = Clock(T0)
    file = deployments_file(tmp_path, emulator.url, {"name": "limited", "rpm": 5})
    gateways = [
        start_gateway(
            clock=clock, DEPLOYMENTS_FILE=file, MAX_ATTEMPTS="1", REDIS_URL=redis_server.url
        )
        for _ in range(2)
    ]
    admitted = await drive_through_a_minute_boundary(clock, gateways, 5)
    assert most_in_any_minute(admitted) == 5
    assert admitted[:6] == [T0 - 40] * 2 + [T0 - 35] * 2 + [T0 - 30, T0 + 25]
    assert len(emulator.requests) == len(admitted)


@pytest.mark.gen_test
async def test_a_day_budget_refuses_at_the_limit_and_resets_at_midnight(
    start_gateway: Callable[..., RunningGateway], tmp_path: Path, emulator: Any
):
    clock = Clock(MONTH_END)
    file = deployments_file(tmp_path, emulator.url, {"name": "limited", "tokens_per_day": 20})
    gateway = start_gateway(clock=clock, DEPLOYMENTS_FILE=file, MAX_ATTEMPTS="1")
    prompt = {"prompt": "one two three four five"}  # 5 tokens in, "You said: ..." 7 out
    for _ in range(2):  # 12, then 24 >= 20: the request that crosses the budget is answered
        assert (await gateway.post("/v1/gpt/chat", prompt, headers=auth(LIMITED_KEY))).code == 200
    refused = await gateway.post("/v1/gpt/chat", prompt, headers=auth(LIMITED_KEY))
    assert refused.code == 429
    body = json.loads(refused.body)
    assert body["error"]["code"] == "budget_exceeded"
    assert "tokens_per_day budget (20 tokens a day)" in body["message"]
    assert "resets at 2101-04-01T00:00:00Z" in body["message"]
    assert refused.headers["Retry-After"] == "10"
    assert len(emulator.requests) == 2

    clock.now = NEXT_MONTH
    renewed = await gateway.post("/v1/gpt/chat", prompt, headers=auth(LIMITED_KEY))
    assert renewed.code == 200 and len(emulator.requests) == 3


@pytest.mark.gen_test
async def test_a_cost_budget_at_the_deployments_price_and_the_cost_reported(
    start_gateway: Callable[..., RunningGateway], tmp_path: Path, emulator: Any
):
    clock = Clock(MONTH_END)
    # A dollar a token in, two out, so the sums are exact.
    price = {"input_per_1m": 1_000_000, "output_per_1m": 2_000_000}
    file = deployments_file(
        tmp_path, emulator.url, {"name": "limited", "usd_per_month": 30}, price=price
    )
    gateway = start_gateway(clock=clock, DEPLOYMENTS_FILE=file, MAX_ATTEMPTS="1")
    body = chat("a b", "gpt-4o")  # 2 tokens in ($2), "You said: a b" 4 out ($8)
    for _ in range(3):
        response = await gateway.post("/v1/chat/completions", body, headers=auth(LIMITED_KEY))
        assert response.code == 200
    refused = await gateway.post("/v1/chat/completions", body, headers=auth(LIMITED_KEY))
    assert refused.code == 429
    error = json.loads(refused.body)["error"]
    assert (
        error["code"] == "budget_exceeded"
        and "usd_per_month budget (US$30 a month)" in (error["message"])
    )
    assert len(emulator.requests) == 3

    report = json.loads((await gateway.get("/v1/usage", headers=auth(ADMIN_KEY))).body)
    assert report["keys"]["limited"]["gpt-4o"] == {
        "requests": 3, "prompt_tokens": 6, "completion_tokens": 12, "cost_usd": 30.0,
    }  # fmt: skip
    found = samples((await gateway.get("/metrics")).body.decode())
    assert sample(found, "gateway_cost_usd_total", key="limited", deployment="gpt-4o") == 30.0
    assert sample(found, "gateway_quota_rejections_total", key="limited", limit="budget") == 1

    clock.now = NEXT_MONTH
    assert (await gateway.post("/v1/chat/completions", body, headers=auth(LIMITED_KEY))).code == 200
