"""Several deployments: routing, retry and failover, against two real emulators."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from emulator import AzureEmulator, Fault
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.upstream.urls import upstream_url

from .conftest import API_VERSION, EMULATOR_KEY
from .support.bodies import chat
from .support.deployments import write_deployments_file

# A is all but certain to be chosen first: weights 1e6 to 1e-3.
HEAVY, LIGHT = 1_000_000, 0.001


@pytest.fixture
def emulator_b(io_loop):
    emu = AzureEmulator(key="key-b-7d1e", deployments=("gpt-4o-b",))
    io_loop.run_sync(lambda: emu.start("127.0.0.1", 0))
    yield emu
    io_loop.run_sync(emu.stop)


def entry(name: str, emu: AzureEmulator, deployment: str, key: str, **extra) -> dict:
    return {
        "name": name,
        "endpoint": emu.url,
        "deployment": deployment,
        "api_version": API_VERSION,
        "key": key,
        **extra,
    }


@pytest.fixture
def two_deployments(tmp_path, emulator, emulator_b, start_gateway):
    """Gateway over A (preferred by weight) and B, both serving model gpt-4o."""

    def start(**env):
        path = write_deployments_file(
            tmp_path,
            [
                entry("a", emulator, "gpt-4o", EMULATOR_KEY, weight=HEAVY, models=["gpt-4o"]),
                entry("b", emulator_b, "gpt-4o-b", "key-b-7d1e", weight=LIGHT, models=["gpt-4o"]),
            ],
        )
        return start_gateway(DEPLOYMENTS_FILE=path, **env)

    return start


@pytest.mark.gen_test
async def test_429_on_a_fails_over_to_b_at_once_and_a_rests(two_deployments, emulator, emulator_b):
    gateway = two_deployments()
    emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "30000"}))
    started = time.monotonic()
    response = await gateway.post("/v1/chat/completions", chat())
    assert response.code == 200
    assert time.monotonic() - started < 5  # B answered without waiting out A's 30 s
    assert response.headers["x-upstream-attempts"] == "2"
    assert (len(emulator.requests), len(emulator_b.requests)) == (1, 1)
    assert emulator_b.requests[0].headers["api-key"] == "key-b-7d1e"

    again = await gateway.post("/v1/chat/completions", chat())
    assert again.headers["x-upstream-attempts"] == "1"
    assert (len(emulator.requests), len(emulator_b.requests)) == (1, 2)


@pytest.mark.gen_test
async def test_with_only_a_the_call_waits_out_retry_after_ms(start_gateway, emulator):
    gateway = start_gateway()
    emulator.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "300"}))
    started = time.monotonic()
    response = await gateway.post("/v1/gpt/chat", {"prompt": "x"})
    assert response.code == 200
    assert time.monotonic() - started >= 0.3
    assert response.headers["x-upstream-attempts"] == "2"


@pytest.mark.gen_test
async def test_500_on_a_goes_to_b(two_deployments, emulator, emulator_b):
    emulator.add_fault(Fault(kind="server_error"))
    response = await two_deployments().post("/v1/gpt/chat", {"prompt": "x"})
    assert response.code == 200
    assert (len(emulator.requests), len(emulator_b.requests)) == (1, 1)


@pytest.mark.gen_test
async def test_content_filter_is_never_retried(two_deployments, emulator, emulator_b):
    emulator.add_fault(Fault(kind="content_filter"))
    response = await two_deployments().post("/v1/chat/completions", chat())
    assert response.code == 400
    assert json.loads(response.body)["error"]["code"] == "content_filter"
    assert response.headers["x-upstream-attempts"] == "1"
    assert emulator_b.requests == []


@pytest.mark.gen_test
async def test_all_rate_limited_for_long_gives_429_with_retry_after(
    two_deployments, emulator, emulator_b
):
    for emu in (emulator, emulator_b):
        emu.add_fault(Fault(kind="rate_limit", headers={"retry-after-ms": "60000"}))
    response = await two_deployments().post("/v1/chat/completions", chat())
    assert response.code == 429
    assert response.headers["Retry-After"] == "60"
    assert json.loads(response.body)["error"]["code"] == "all_deployments_busy"


@pytest.mark.gen_test
async def test_attempts_are_bounded_and_the_last_failure_answers(
    two_deployments, emulator, emulator_b
):
    for emu in (emulator, emulator_b):
        emu.add_fault(Fault(kind="unavailable", times=5))
    response = await two_deployments(MAX_ATTEMPTS="2").post("/v1/chat/completions", chat())
    assert response.code == 502
    assert response.headers["x-upstream-attempts"] == "2"
    assert len(emulator.requests) + len(emulator_b.requests) == 2


@pytest.mark.gen_test(timeout=10)
async def test_hang_before_headers_retries_on_b_after_first_byte_timeout(
    two_deployments, emulator, emulator_b
):
    emulator.add_fault(Fault(hang=True))
    started = time.monotonic()
    response = await two_deployments(FIRST_BYTE_TIMEOUT="0.5").post(
        "/v1/chat/completions", chat(stream=True)
    )
    assert response.code == 200
    assert time.monotonic() - started >= 0.5
    assert response.body.rstrip().endswith(b"data: [DONE]")
    assert response.headers["x-upstream-attempts"] == "2"
    assert len(emulator_b.requests) == 1


@pytest.mark.gen_test
async def test_no_retry_once_a_stream_has_started(two_deployments, emulator, emulator_b):
    emulator.add_fault(Fault(reset_after=2))
    response = await two_deployments().post("/v1/chat/completions", chat("a b c d", stream=True))
    assert response.code == 200
    assert b"[DONE]" not in response.body
    assert emulator_b.requests == []


@pytest.mark.gen_test
async def test_models_route_by_name_deployment_or_alias(
    tmp_path, emulator, emulator_b, start_gateway
):
    path = write_deployments_file(
        tmp_path,
        [
            entry("east", emulator, "gpt-4o", EMULATOR_KEY, models=["gpt-4o", "smart"]),
            entry("west", emulator_b, "gpt-4o-b", "key-b-7d1e", models=["mini"]),
        ],
    )
    gateway = start_gateway(DEPLOYMENTS_FILE=path)
    for model, target in (
        ("smart", emulator),
        ("east", emulator),
        ("mini", emulator_b),
        ("west", emulator_b),
    ):
        before = len(target.requests)
        response = await gateway.post("/v1/chat/completions", {**chat(), "model": model})
        assert response.code == 200
        assert len(target.requests) == before + 1
    azure = await gateway.post(
        f"/openai/deployments/gpt-4o-b/chat/completions?api-version={API_VERSION}", chat()
    )
    assert azure.code == 200 and len(emulator_b.requests) == 3
    missing = await gateway.post("/v1/chat/completions", {**chat(), "model": "nope"})
    assert missing.code == 404
    assert json.loads(missing.body)["error"]["code"] == "model_not_found"
    missing_azure = await gateway.post(
        f"/openai/deployments/nope/chat/completions?api-version={API_VERSION}", chat()
    )
    assert json.loads(missing_azure.body)["error"]["code"] == "DeploymentNotFound"
    models = json.loads((await gateway.get("/v1/models")).body)
    assert {"east", "gpt-4o", "smart", "west", "gpt-4o-b", "mini"} == {
        m["id"] for m in models["data"]
    }


@pytest.mark.gen_test
async def test_request_id_in_and_out(gateway, emulator):
    response = await gateway.post(
        "/v1/gpt/chat", {"prompt": "x"}, headers={"x-request-id": "abc-123"}
    )
    assert response.headers["x-request-id"] == "abc-123"
    assert emulator.requests[-1].headers["x-request-id"] == "abc-123"
    assert response.headers["apim-request-id"]
    emulator.add_fault(Fault(kind="server_error"))
    failed = await gateway.post(
        "/v1/gpt/chat", {"prompt": "x"}, headers={"x-request-id": "abc-456"}
    )
    assert failed.code == 502
    assert failed.headers["x-request-id"] == "abc-456"
    assert failed.headers["apim-request-id"]
    generated = await gateway.post(
        "/v1/gpt/chat", {"prompt": "x"}, headers={"x-request-id": "bad id!"}
    )
    assert len(generated.headers["x-request-id"]) == 32


# --- the deployments file at start-up -------------------------------------------------


def load(tmp_path: Path, text: str, **env: str):
    path = tmp_path / "deployments.yaml"
    path.write_text(text)
    empty = tmp_path / "empty.env"
    empty.write_text("")
    return load_settings({"ENV_FILE": str(empty), "DEPLOYMENTS_FILE": str(path), **env})


def problems(tmp_path: Path, text: str, **env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text, **env)
    return caught.value.problems


GOOD = """
deployments:
  - name: east
    endpoint: https://east.example.com/
    deployment: gpt-4o
    api_version: "2024-10-21"
    key: ${EAST_KEY}
    weight: 2
  - name: west
    endpoint: https://west.example.com
    deployment: gpt-4o
    api_version: "2024-10-21"
    key: literal-key
    models: [gpt-4o, smart]
"""


def test_deployments_file_is_loaded_with_variables(tmp_path):
    settings = load(tmp_path, GOOD, EAST_KEY="from-env")
    east, west = settings.deployments
    assert (east.name, east.key.reveal(), east.weight, east.models) == (
        "east",
        "from-env",
        2,
        ("gpt-4o",),
    )
    assert (
        upstream_url(east, "chat/completions")
        == "https://east.example.com/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    )
    assert (west.key.reveal(), west.models) == ("literal-key", ("gpt-4o", "smart"))


def test_unset_variable_is_named(tmp_path):
    assert problems(tmp_path, GOOD) == [
        "DEPLOYMENTS_FILE deployments[0] (east).key: ${EAST_KEY} is not set in the environment"
    ]


def test_unknown_field_missing_key_and_duplicate_name(tmp_path):
    text = GOOD.replace("    weight: 2", "    wieght: 2").replace("    key: literal-key\n", "")
    found = problems(tmp_path, text, EAST_KEY="x")
    assert (
        "DEPLOYMENTS_FILE deployments[0] (east): has unknown field 'wieght' (check the spelling)"
        in found
    )
    assert "DEPLOYMENTS_FILE deployments[1] (west): needs one of the fields 'key', 'auth'" in found
    duplicate = problems(tmp_path, GOOD.replace("name: west", "name: east"), EAST_KEY="x")
    assert duplicate == ["DEPLOYMENTS_FILE deployments[1] (east).name: duplicate name 'east'"]


def test_bad_values_and_bare_date_version(tmp_path):
    text = GOOD.replace(
        'api_version: "2024-10-21"\n    key: literal-key',
        "api_version: 2024-10-21\n    key: literal-key",
    )
    assert upstream_url(
        load(tmp_path, text, EAST_KEY="x").deployments[1], "chat/completions"
    ).endswith("?api-version=2024-10-21")  # a bare YAML date is read as the text it was written as
    text = text.replace("weight: 2", "weight: 0")
    found = problems(tmp_path, text, EAST_KEY="x")
    assert "DEPLOYMENTS_FILE deployments[0] (east).weight: must be > 0 (got 0)" in found
    assert not any("api_version" in line for line in found)


def test_unreadable_or_invalid_yaml(tmp_path):
    assert problems(tmp_path, "deployments: [")[0].startswith("DEPLOYMENTS_FILE: ")
    assert problems(tmp_path, "deployments: []") == [
        "DEPLOYMENTS_FILE deployments: must have at least 1 item(s) (got [])"
    ]


def test_endpoint_may_come_from_a_variable(tmp_path):
    text = GOOD.replace("endpoint: https://east.example.com/", "endpoint: ${EAST_URL}")
    settings = load(tmp_path, text, EAST_KEY="k", EAST_URL="https://east.example.com")
    assert settings.deployments[0].endpoint == "https://east.example.com"
    assert problems(tmp_path, text, EAST_KEY="k", EAST_URL="east.example.com") == [
        "DEPLOYMENTS_FILE deployments[0] (east).endpoint: must be a URL starting with https:// (or http://)"
    ]


@pytest.mark.gen_test
@pytest.mark.parametrize("value", ["inf", "1e400", "nan"])
async def test_a_429_with_a_retry_header_that_is_no_number_stays_a_429(gateway, emulator, value):
    emulator.add_fault(Fault(status=429, headers={"retry-after-ms": value}))
    response = await gateway.post("/v1/chat/completions", chat())
    assert response.code == 429
    assert "Retry-After" not in response.headers
    assert json.loads(response.body)["error"]["code"] == "429"


@pytest.mark.gen_test
async def test_a_huge_retry_after_rests_a_deployment_no_longer_than_max_cooldown(
    two_deployments, emulator, emulator_b
):
    gateway = two_deployments(MAX_COOLDOWN="45")
    emulator.add_fault(Fault(status=429, headers={"retry-after-ms": "99999999999"}))
    response = await gateway.post("/v1/chat/completions", chat())
    assert response.code == 200 and response.headers["x-upstream-attempts"] == "2"
    pool = gateway.server.pipeline.pool
    a = next(d for d in pool.deployments if d.name == "a")
    assert 40 < pool.cooling_for(a) <= 45


@pytest.mark.gen_test
async def test_the_retry_after_sent_to_the_caller_is_capped_too(
    two_deployments, emulator, emulator_b
):
    for emu in (emulator, emulator_b):
        emu.add_fault(Fault(status=429, headers={"retry-after-ms": "99999999999"}))
    response = await two_deployments().post("/v1/chat/completions", chat())
    assert response.code == 429
    assert response.headers["Retry-After"] == "60"
    assert json.loads(response.body)["error"]["code"] == "all_deployments_busy"
