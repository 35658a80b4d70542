"""Priority groups end to end: a PTU deployment first, pay-as-you-go only when the PTU is full,
by its 429s or by Azure's remaining counts, and back once it recovers. Real sockets; both
deployments are on one emulator, whose `requests` say which one each request reached."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from emulator import Fault

from .conftest import API_VERSION, DEPLOYMENT, RunningGateway
from .support.bodies import chat
from .support.deployments import write_deployments_file
from .support.metrics import sample, samples

# A request's estimate: some ten prompt tokens and the default completion budget of 1024.
PLENTY = "90000"
TOO_FEW = "100"


@pytest.fixture
def ptu_and_paygo(
    start_gateway: Callable[..., RunningGateway], tmp_path: Path, emulator: Any
) -> RunningGateway:
    """`ptu` (priority 1, Azure deployment gpt-4o) and `paygo` (priority 2), both serving gpt-4o."""
    common = {"endpoint": emulator.url, "api_version": API_VERSION, "key": "${KEY}"}
    file = write_deployments_file(
        tmp_path,
        [
            {"name": "ptu", "deployment": DEPLOYMENT, "models": ["gpt-4o"], **common},
            {"name": "paygo", "deployment": "other-deployment", "models": ["gpt-4o"],
             "priority": 2, **common},
        ],
    )  # fmt: skip
    return start_gateway(DEPLOYMENTS_FILE=file, MAX_ATTEMPTS="2")


async def reached(gateway: RunningGateway, count: int, **body: Any) -> list[str]:
    """The Azure deployment each attempt of `count` requests for gpt-4o reached, in order."""
    before = len(gateway.emulator.requests)
    for _ in range(count):
        response = await gateway.post("/v1/chat/completions", chat("route me", **body))
        assert response.code == 200, response.body
    return [request.deployment for request in gateway.emulator.requests[before:]]


@pytest.mark.gen_test(timeout=30)
async def test_an_idle_ptu_takes_every_request(ptu_and_paygo):
    assert await reached(ptu_and_paygo, 20) == [DEPLOYMENT] * 20
    assert await reached(ptu_and_paygo, 5, stream=True) == [DEPLOYMENT] * 5
    found = samples((await ptu_and_paygo.get("/metrics")).body.decode())
    assert not any(name == "gateway_spills_total" for name, _ in found)


@pytest.mark.gen_test(timeout=30)
async def test_a_ptu_answering_429_spills_to_priority_2_and_back_once_cooled(ptu_and_paygo):
    gateway = ptu_and_paygo
    gateway.emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "500"}))
    # The 429 is retried on paygo at once; paygo takes the requests while the PTU cools down.
    assert await reached(gateway, 3) == [DEPLOYMENT] + ["other-deployment"] * 3
    await asyncio.sleep(0.6)  # the cool-down Azure asked for is the subject here
    assert await reached(gateway, 3) == [DEPLOYMENT] * 3
    found = samples((await gateway.get("/metrics")).body.decode())
    assert sample(found, "gateway_spills_total", deployment="paygo", priority="2") == 3


@pytest.mark.gen_test(timeout=30)
async def test_low_remaining_tokens_spill_to_priority_2_and_a_fresh_count_brings_them_back(
    ptu_and_paygo,
):
    gateway = ptu_and_paygo
    # A successful PTU answer says it has 10 tokens left: less than any request's estimate.
    gateway.emulator.add_fault(
        Fault(
            headers={"x-ratelimit-remaining-tokens": TOO_FEW, "x-ratelimit-remaining-requests": "7"}
        )
    )
    assert await reached(gateway, 1) == [DEPLOYMENT]
    found = samples((await gateway.get("/metrics")).body.decode())
    assert sample(found, "gateway_deployment_remaining_tokens", deployment="ptu") == 100
    assert sample(found, "gateway_deployment_remaining_requests", deployment="ptu") == 7
    assert (
        0 <= sample(found, "gateway_deployment_remaining_tokens_age_seconds", deployment="ptu") < 10
    )
    assert sample(found, "gateway_deployment_requests_in_flight", deployment="ptu") == 0

    assert await reached(gateway, 4) == ["other-deployment"] * 4
    # A request small enough for what is left still goes to the PTU.
    assert await reached(gateway, 1, max_tokens=1) == [DEPLOYMENT]

    # The PTU's next answer (here for a request addressed to it) reports room again.
    gateway.emulator.add_fault(Fault(headers={"x-ratelimit-remaining-tokens": PLENTY}))
    pinned = await gateway.post(
        f"/openai/deployments/ptu/chat/completions?api-version={API_VERSION}",
        chat("pinned"),
    )
    assert pinned.code == 200
    assert await reached(gateway, 3) == [DEPLOYMENT] * 3
    found = samples((await gateway.get("/metrics")).body.decode())
    assert sample(found, "gateway_spills_total", deployment="paygo", priority="2") == 4
    assert sample(found, "gateway_deployment_remaining_tokens", deployment="ptu") == int(PLENTY)


@pytest.mark.gen_test(timeout=30)
async def test_azure_saying_minus_one_is_unknown_not_full(ptu_and_paygo):
    gateway = ptu_and_paygo
    gateway.emulator.add_fault(Fault(headers={"x-ratelimit-remaining-tokens": "-1"}))
    assert await reached(gateway, 4) == [DEPLOYMENT] * 4
    found = samples((await gateway.get("/metrics")).body.decode())
    assert not any(
        name == "gateway_deployment_remaining_tokens" and ("deployment", "ptu") in labels
        for name, labels in found
    )
