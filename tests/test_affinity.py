"""Stored responses follow the deployment that made them: two emulated Azure resources
serving one model, each knowing only its own responses (as Azure does)."""

from __future__ import annotations

import json

import openai
import pytest
import redis
from tornado.httpclient import AsyncHTTPClient

from emulator import AzureEmulator, Fault

from .conftest import DEPLOYMENT, EMULATOR_KEY, free_port, server_env
from .support.deployments import write_deployments_file

WEST_KEY = "west-key-5c2b90"


@pytest.fixture
def west(io_loop):
    emu = AzureEmulator(key=WEST_KEY, deployments=(DEPLOYMENT,))
    io_loop.run_sync(lambda: emu.start("127.0.0.1", 0))
    yield emu
    io_loop.run_sync(emu.stop)


@pytest.fixture
def deployments_file(tmp_path, emulator, west):
    """East (the `emulator` fixture) and west, equal weights, both serving gpt-4o on v1."""
    return write_deployments_file(
        tmp_path,
        [
            {
                "name": name,
                "endpoint": emu.url,
                "deployment": DEPLOYMENT,
                "api_version": "v1",
                "key": key,
                "models": [DEPLOYMENT],
            }
            for name, emu, key in (("east", emulator, EMULATOR_KEY), ("west", west, WEST_KEY))
        ],
    )


def client_of(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def operations(emu: AzureEmulator) -> list[str]:
    return [request.operation for request in emu.requests]


async def create_directly(emu: AzureEmulator, key: str, text: str) -> str:
    """A response made on `emu` without the gateway (by another gateway, or before a restart)."""
    http = AsyncHTTPClient(force_instance=True)
    try:
        answer = await http.fetch(
            emu.url + "/openai/v1/responses",
            method="POST",
            body=json.dumps({"model": DEPLOYMENT, "input": text}),
            headers={"api-key": key, "Content-Type": "application/json"},
        )
    finally:
        http.close()
    return json.loads(answer.body)["id"]


@pytest.mark.gen_test
async def test_every_turn_of_a_conversation_reaches_the_deployment_that_made_the_first(
    start_gateway, deployments_file, emulator, west
):
    gateway = start_gateway(DEPLOYMENTS_FILE=deployments_file)
    holders = []
    async with client_of(gateway.url) as client:
        for conversation in range(6):
            emulator.requests.clear()
            west.requests.clear()
            turn = await client.responses.create(model=DEPLOYMENT, input=f"c{conversation} 1")
            for number in (2, 3):
                turn = await client.responses.create(
                    model=DEPLOYMENT,
                    input=f"c{conversation} {number}",
                    previous_response_id=turn.id,
                    stream=number == 3,
                )
                if number == 3:
                    turn = [event async for event in turn][-1].response
            assert turn.status == "completed"
            made = [emu for emu in (emulator, west) if emu.requests]
            assert len(made) == 1, "one conversation, one deployment"
            assert operations(made[0]) == ["responses.create"] * 3
            assert [r.json.get("previous_response_id") for r in made[0].requests][0] is None
            holders.append(made[0])
            retrieved = await client.responses.retrieve(turn.id)
            assert retrieved.id == turn.id
            assert operations(made[0])[-1] == "responses.retrieve"
    assert {id(h) for h in holders} == {id(emulator), id(west)}, "both deployments served"


@pytest.mark.gen_test
async def test_an_unseen_id_is_looked_up_once_then_followed(
    start_gateway, deployments_file, emulator, west
):
    gateway = start_gateway(DEPLOYMENTS_FILE=deployments_file)
    made_on_west = await create_directly(west, WEST_KEY, "made elsewhere")
    west.requests.clear()
    async with client_of(gateway.url) as client:
        found = await client.responses.retrieve(made_on_west)
        assert found.id == made_on_west
        # East (first in the file) said 404; west answered; now it is recorded.
        assert operations(emulator) == ["responses.retrieve"]
        assert operations(west) == ["responses.retrieve"]
        emulator.requests.clear()
        west.requests.clear()
        follow_up = await client.responses.create(
            model=DEPLOYMENT, input="and then?", previous_response_id=made_on_west
        )
    assert follow_up.status == "completed"
    assert operations(emulator) == []
    assert operations(west) == ["responses.create"]
    assert west.requests[-1].json["previous_response_id"] == made_on_west


@pytest.mark.gen_test
async def test_an_unseen_previous_response_is_looked_up_before_the_create(
    start_gateway, deployments_file, emulator, west
):
    gateway = start_gateway(DEPLOYMENTS_FILE=deployments_file)
    made_on_west = await create_directly(west, WEST_KEY, "before a restart")
    west.requests.clear()
    async with client_of(gateway.url) as client:
        turn = await client.responses.create(
            model=DEPLOYMENT, input="continue", previous_response_id=made_on_west
        )
        assert turn.status == "completed"
        assert operations(emulator) == ["responses.retrieve"]
        assert operations(west) == ["responses.retrieve", "responses.create"]
        with pytest.raises(openai.BadRequestError) as raised:
            await client.responses.create(
                model=DEPLOYMENT, input="x", previous_response_id="resp_nowhere"
            )
    assert raised.value.code == "previous_response_not_found"
    assert raised.value.param == "previous_response_id"


@pytest.mark.gen_test
async def test_a_cooling_holder_is_waited_for_never_replaced(
    start_gateway, deployments_file, emulator, west
):
    gateway = start_gateway(DEPLOYMENTS_FILE=deployments_file, MAX_RETRY_WAIT="0.5")
    made_on_west = await create_directly(west, WEST_KEY, "hold me")
    async with client_of(gateway.url) as client:
        await client.responses.retrieve(made_on_west)
        emulator.requests.clear()
        west.requests.clear()
        west.add_fault(Fault(kind="rate_limit", headers={"retry-after": "60"}))
        with pytest.raises(openai.InternalServerError) as raised:
            await client.responses.create(
                model=DEPLOYMENT, input="now", previous_response_id=made_on_west
            )
    assert raised.value.status_code == 503
    assert "'west'" in raised.value.message
    assert raised.value.response.headers["Retry-After"]
    assert operations(emulator) == []
    assert operations(west) == ["responses.create"]


@pytest.mark.gen_test
async def test_a_response_not_stored_is_not_recorded(start_gateway, deployments_file):
    gateway = start_gateway(DEPLOYMENTS_FILE=deployments_file)
    affinity = gateway.server.pipeline.affinity
    async with client_of(gateway.url) as client:
        kept = await client.responses.create(model=DEPLOYMENT, input="kept")
        dropped = await client.responses.create(model=DEPLOYMENT, input="gone", store=False)
        streamed = await client.responses.create(model=DEPLOYMENT, input="s", stream=True)
        streamed_id = [event async for event in streamed][0].response.id
    assert await affinity.owner(kept.id) in ("east", "west")
    assert await affinity.owner(streamed_id) in ("east", "west")
    assert await affinity.owner(dropped.id) is None


@pytest.mark.gen_test(timeout=60)
async def test_two_processes_sharing_redis_follow_each_others_responses(
    tmp_path, spawn, redis_server, deployments_file, emulator, west
):
    ports = [free_port(), free_port()]
    servers = [
        spawn(
            server_env(
                tmp_path,
                HTTP_PORT=str(port),
                DEPLOYMENTS_FILE=deployments_file,
                REDIS_URL=redis_server.url,
                RESPONSE_AFFINITY_TTL="3600",
            )
        )
        for port in ports
    ]
    for server in servers:
        server.wait_for(r"listening on http://")
    first, other = (client_of(f"http://127.0.0.1:{port}") for port in ports)
    async with first, other:
        for conversation in range(4):
            emulator.requests.clear()
            west.requests.clear()
            turn = await first.responses.create(model=DEPLOYMENT, input=f"p{conversation}")
            follow_up = await other.responses.create(
                model=DEPLOYMENT, input="more", previous_response_id=turn.id
            )
            assert follow_up.status == "completed"
            holders = [emu for emu in (emulator, west) if emu.requests]
            # No lookup: the other process knew the holder from Redis.
            assert len(holders) == 1 and operations(holders[0]) == ["responses.create"] * 2
    store = redis.Redis.from_url(redis_server.url)
    try:
        assert store.get(f"azgw:response:{follow_up.id}") in (b"east", b"west")
        assert 3500 < store.ttl(f"azgw:response:{follow_up.id}") <= 3600
    finally:
        store.close()
