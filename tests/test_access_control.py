"""Caller keys, per-key quotas, the usage report, metrics and health, end to end.

Every request goes over a real socket to a real gateway (in this process, or
`server.py` in a child process) and from there to the emulator, which counts
one token per word. Limits count over a sliding 60 s window: tests of the
in-process store pin the gateway's quota clock (`quota_clock`) instead of
waiting for a minute to pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from emulator import AzureEmulator, words

from .conftest import (
    API_VERSION,
    DEPLOYMENT,
    EMULATOR_KEY,
    RedisServer,
    RunningGateway,
    free_port,
    server_env,
)
from .support.bodies import chat
from .support.clock import Clock
from .support.deployments import write_deployments_file as write_file
from .support.metrics import sample, samples
from .support.sse import parse_events

# Caller keys; none of them may ever show in a log line, a metric or a body.
ADMIN_KEY = "sk-admin-5f1d0c9e7a"
ALICE_KEY = "sk-alice-3b8e61f0d2"
BOB_KEY = "sk-bob-a09c4e7731"  # may use gpt-4o only
RPM_KEY = "sk-rpm-7e2d9b1c44"  # 3 requests a minute
TPM_KEY = "sk-tpm-c6a0f38e15"  # 1000 tokens a minute
METRICS_KEY = "sk-metrics-91b7e2d04a"
# Keys callers present that are not configured.
WRONG_KEYS = ("sk-wrong-0d5c7a2b9f", "sk-guess-6e4f1a8c30")

KEY_ENTRIES = [
    {"name": "admin", "key": ADMIN_KEY, "admin": True},
    {"name": "alice", "key": ALICE_KEY},
    {"name": "bob", "key": BOB_KEY, "models": ["gpt-4o"]},
    # Held to gpt-4o too, so that the original route (no model) always goes there.
    {"name": "rpm3", "key": RPM_KEY, "rpm": 3, "models": ["gpt-4o"]},
    {"name": "tpm1000", "key": TPM_KEY, "tpm": 1000, "models": ["gpt-4o"]},
]
# Two deployments on the one emulator: "gpt-4o", and "mini" serving gpt-4o-mini.
DEPLOYMENT_ENTRIES = [
    {"name": "gpt-4o", "deployment": DEPLOYMENT, "api_version": API_VERSION, "key": "${KEY}",
     "models": ["gpt-4o"]},
    {"name": "mini", "deployment": "other-deployment", "api_version": API_VERSION, "key": "${KEY}",
     "models": ["gpt-4o-mini"]},
]  # fmt: skip

# The start of some minute, far from now: the pinned quota clock starts 10 s into it.
T0 = 29_000_000 * 60.0
STARTUP_TIMEOUT = 20.0


# --- helpers ------------------------------------------------------------------


def write_deployments_file(
    tmp_path: Path,
    endpoint: str,
    keys: list[dict[str, Any]],
    deployments: list[dict[str, Any]] = DEPLOYMENT_ENTRIES,
) -> str:
    """A DEPLOYMENTS_FILE on `endpoint`, taking the upstream key from KEY."""
    return write_file(tmp_path, [{**entry, "endpoint": endpoint} for entry in deployments], keys)


def auth(key: str, bearer: bool = False) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if bearer else {"api-key": key}


def body_of(response: HTTPResponse) -> Any:
    return json.loads(response.body)


def tokens(text: str) -> int:
    """How many tokens the emulator counts in `text` (one a word)."""
    return len(words(text))


def echo_usage(prompt: str) -> dict[str, int]:
    """The usage the emulator reports for a one-message prompt: it answers "You said: <prompt>"."""
    prompt_tokens, completion_tokens = tokens(prompt), tokens(f"You said: {prompt}")
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def assert_envelope_error(response: HTTPResponse, status: int, code: str) -> dict[str, Any]:
    """The original route's error shape: success 0, a message, an error object."""
    assert response.code == status, response.body
    body = body_of(response)
    assert body["success"] == 0 and body["message"] == body["error"]["message"]
    assert body["error"]["code"] == code
    return body


def assert_openai_error(response: HTTPResponse, status: int, code: str) -> dict[str, Any]:
    """OpenAI's error shape: only an error object, which the SDKs parse."""
    assert response.code == status, response.body
    body = body_of(response)
    assert set(body) == {"error"} and body["error"]["code"] == code
    assert body["error"]["message"]
    return body


@pytest.fixture
def quota_clock() -> Clock:
    """Pins the quota windows' clock of the gateways `start_keyed_gateway` starts."""
    return Clock(T0 + 10)


@pytest.fixture
def start_keyed_gateway(
    request: pytest.FixtureRequest,
    io_loop: Any,
    tmp_path: Path,
    emulator: AzureEmulator,
    start_gateway: Callable[..., RunningGateway],
):
    """A gateway with KEY_ENTRIES (or `keys`) and both deployments; its quota store is closed after.

    With the `quota_clock` fixture, its quota windows follow that clock.
    """
    started: list[RunningGateway] = []
    clock = (
        request.getfixturevalue("quota_clock") if "quota_clock" in request.fixturenames else None
    )

    def start(keys: list[dict[str, Any]] | None = None, **env: str) -> RunningGateway:
        running = start_gateway(
            clock=clock,
            MAX_ATTEMPTS="1",
            DEPLOYMENTS_FILE=write_deployments_file(tmp_path, emulator.url, keys or KEY_ENTRIES),
            **env,
        )
        started.append(running)
        return running

    yield start
    for running in started:
        io_loop.run_sync(running.server.pipeline.quota.close)


# --- 401 and 403 ------------------------------------------------------------------


@pytest.mark.gen_test
async def test_missing_or_wrong_key_is_401_in_each_routes_shape_and_azure_is_not_called(
    start_gateway,
):
    gateway = start_gateway(API_KEYS=f"{ALICE_KEY}, {BOB_KEY}")
    prompt = {"prompt": "hello"}
    openai_body = chat("hello", "gpt-4o")

    missing = assert_envelope_error(
        await gateway.post("/v1/gpt/chat", prompt), 401, "missing_api_key"
    )
    assert missing["error"]["type"] == "authentication_error"
    for headers in (auth(WRONG_KEYS[0]), auth(WRONG_KEYS[1], bearer=True)):
        response = await gateway.post("/v1/gpt/chat", prompt, headers=headers)
        assert_envelope_error(response, 401, "invalid_api_key")
        assert response.headers["WWW-Authenticate"] == "Bearer"

    response = await gateway.post("/v1/chat/completions", openai_body)
    assert_openai_error(response, 401, "missing_api_key")
    assert response.headers["WWW-Authenticate"] == "Bearer"
    for headers, code in (
        (auth(WRONG_KEYS[0]), "invalid_api_key"),
        (auth(WRONG_KEYS[1], bearer=True), "invalid_api_key"),
        ({"Authorization": f"Basic {ALICE_KEY}"}, "missing_api_key"),  # only Bearer carries a key
    ):
        response = await gateway.post("/v1/chat/completions", openai_body, headers=headers)
        assert_openai_error(response, 401, code)
    azure_path = f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={API_VERSION}"
    assert_openai_error(await gateway.post(azure_path, openai_body), 401, "missing_api_key")
    assert_openai_error(await gateway.get("/v1/models"), 401, "missing_api_key")
    assert gateway.emulator.requests == []

    # Both headers are accepted, for every configured key; the Bearer scheme in any case.
    accepted = [
        await gateway.post("/v1/gpt/chat", prompt, headers=auth(ALICE_KEY)),
        await gateway.post("/v1/gpt/chat", prompt, headers=auth(BOB_KEY, bearer=True)),
        await gateway.post(
            "/v1/chat/completions", openai_body, headers={"authorization": f"bearer {ALICE_KEY}"}
        ),
        await gateway.post(azure_path, openai_body, headers=auth(BOB_KEY)),
    ]
    assert [response.code for response in accepted] == [200] * 4
    assert body_of(accepted[0])["success"] == 1
    assert len(gateway.emulator.requests) == 4
    # Azure gets the gateway's key, never the caller's.
    assert all(request.headers["api-key"] == EMULATOR_KEY for request in gateway.emulator.requests)
    assert all("authorization" not in request.headers for request in gateway.emulator.requests)


@pytest.mark.gen_test
async def test_a_key_limited_to_some_models_gets_403_for_others_and_sees_only_its_own(
    start_keyed_gateway,
):
    gateway = start_keyed_gateway()
    emulator = gateway.emulator

    refused = await gateway.post(
        "/v1/chat/completions", chat("hi", "gpt-4o-mini"), headers=auth(BOB_KEY)
    )
    error = assert_openai_error(refused, 403, "model_not_allowed")["error"]
    assert "'bob'" in error["message"] and "gpt-4o-mini" in error["message"]
    azure_other = f"/openai/deployments/other-deployment/chat/completions?api-version={API_VERSION}"
    azure_refused = await gateway.post(azure_other, chat("hi", "x"), headers=auth(BOB_KEY))
    assert_openai_error(azure_refused, 403, "model_not_allowed")
    assert emulator.requests == []

    allowed = await gateway.post(
        "/v1/chat/completions", chat("hi", "gpt-4o"), headers=auth(BOB_KEY)
    )
    assert allowed.code == 200
    # The original route names no model: it goes only where the key may go.
    for _ in range(4):
        assert (
            await gateway.post("/v1/gpt/chat", {"prompt": "hi"}, headers=auth(BOB_KEY))
        ).code == 200
    assert [request.deployment for request in emulator.requests] == [DEPLOYMENT] * 5
    # An unrestricted key may use the other deployment.
    other = await gateway.post(
        "/v1/chat/completions", chat("hi", "gpt-4o-mini"), headers=auth(ALICE_KEY)
    )
    assert other.code == 200 and emulator.requests[-1].deployment == "other-deployment"

    def model_ids(response: HTTPResponse) -> list[str]:
        assert response.code == 200
        return [model["id"] for model in body_of(response)["data"]]

    assert model_ids(await gateway.get("/v1/models", headers=auth(BOB_KEY))) == ["gpt-4o"]
    assert model_ids(await gateway.get("/v1/models", headers=auth(ALICE_KEY, bearer=True))) == [
        "gpt-4o", "mini", "other-deployment", "gpt-4o-mini",
    ]  # fmt: skip
    assert_openai_error(
        await gateway.get("/v1/models", headers=auth(WRONG_KEYS[0])), 401, "invalid_api_key"
    )


# --- requests and tokens per minute, in this process --------------------------------


@pytest.mark.gen_test
async def test_rpm_admits_rpm_requests_then_429_until_the_first_leaves_the_window(
    start_keyed_gateway, quota_clock
):
    gateway = start_keyed_gateway()
    statuses, remaining = [], []
    for _ in range(4):
        response = await gateway.post("/v1/gpt/chat", {"prompt": "count"}, headers=auth(RPM_KEY))
        statuses.append(response.code)
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert "x-ratelimit-limit-tokens" not in response.headers
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert statuses == [200, 200, 200, 429]
    assert remaining == ["2", "1", "0", "0"]
    assert len(gateway.emulator.requests) == 3

    refused = await gateway.post("/v1/gpt/chat", {"prompt": "count"}, headers=auth(RPM_KEY))
    body = assert_envelope_error(refused, 429, "rate_limit_exceeded")
    assert body["error"]["type"] == "rate_limit_error" and "'rpm3'" in body["message"]
    # The three were admitted in the second T0 + 10: it leaves the window 61 s later.
    assert refused.headers["Retry-After"] == "61"
    assert refused.headers["x-request-id"]
    openai_refused = await gateway.post(
        "/v1/chat/completions", chat("count", "gpt-4o"), headers=auth(RPM_KEY)
    )
    assert_openai_error(openai_refused, 429, "rate_limit_exceeded")
    assert openai_refused.headers["Retry-After"] == "61"
    assert len(gateway.emulator.requests) == 3

    # Other keys are not limited by it, and an unlimited key gets no rate-limit headers.
    free = await gateway.post("/v1/gpt/chat", {"prompt": "free"}, headers=auth(ALICE_KEY))
    assert free.code == 200 and not any(
        name.lower().startswith("x-ratelimit") for name in free.headers
    )

    # The calendar minute turning frees nothing (no burst at the boundary) ...
    quota_clock.now = T0 + 60
    still = await gateway.post("/v1/gpt/chat", {"prompt": "count"}, headers=auth(RPM_KEY))
    assert still.code == 429 and still.headers["Retry-After"] == "11"
    # ... the admitted requests leaving the window does.
    quota_clock.now = T0 + 71
    renewed = await gateway.post("/v1/gpt/chat", {"prompt": "count"}, headers=auth(RPM_KEY))
    assert renewed.code == 200 and renewed.headers["x-ratelimit-remaining-requests"] == "2"
    assert "Retry-After" not in renewed.headers
    assert len(gateway.emulator.requests) == 5


@pytest.mark.gen_test
async def test_tpm_charges_the_estimate_and_corrects_it_to_azures_usage(
    start_keyed_gateway, quota_clock
):
    gateway = start_keyed_gateway()
    # A prompt estimated at 5,000 tokens can never fit 1000 a minute: refused, Azure not called.
    huge = await gateway.post(
        "/v1/chat/completions", chat("word " * 3000, "gpt-4o"), headers=auth(TPM_KEY)
    )
    body = assert_openai_error(huge, 429, "tokens_exceed_limit")
    assert "prompt alone is estimated at 5009 tokens" in body["error"]["message"]
    assert "No retry will help" in body["error"]["message"]
    assert "Retry-After" not in huge.headers
    assert gateway.emulator.requests == []

    # Admission charges the estimate: 12 prompt tokens (characters) + max_tokens 100.
    first = await gateway.post(
        "/v1/chat/completions", chat("hi there", "gpt-4o", max_tokens=100), headers=auth(TPM_KEY)
    )
    assert first.code == 200
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 112)
    assert "x-ratelimit-limit-requests" not in first.headers
    # The answer corrected the charge to Azure's count (2 + 4 = 6 tokens).
    assert body_of(first)["usage"] == echo_usage("hi there")

    # A stream is corrected by the usage event the gateway asked Azure for.
    second = await gateway.post(
        "/v1/chat/completions",
        chat("hi there", "gpt-4o", stream=True, max_tokens=100),
        headers=auth(TPM_KEY),
    )
    assert second.code == 200
    assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 6 - 112)
    assert all(b'"usage":{' not in event for event in parse_events(second.body))

    # 12 used; a request whose estimate (12 + 980) does not fit waits for the window.
    asked_much = chat("hi there", "gpt-4o", max_tokens=980)
    for moment in (T0 + 11, T0 + 69):
        quota_clock.now = moment
        refused = await gateway.post("/v1/chat/completions", asked_much, headers=auth(TPM_KEY))
        body = assert_openai_error(refused, 429, "rate_limit_exceeded")
        assert "1000 tokens per minute" in body["error"]["message"]
        assert refused.headers["x-ratelimit-limit-tokens"] == "1000"
        assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - 12)
        assert refused.headers["Retry-After"] == str(int(T0 + 10 + 61 - moment))
    assert len(gateway.emulator.requests) == 2

    quota_clock.now = T0 + 71
    renewed = await gateway.post("/v1/chat/completions", asked_much, headers=auth(TPM_KEY))
    assert renewed.code == 200
    assert renewed.headers["x-ratelimit-remaining-tokens"] == str(1000 - 992)


# --- two processes sharing one Redis ---------------------------------------------------


@pytest.fixture
def client():
    http = AsyncHTTPClient(force_instance=True)
    yield http
    http.close()


@pytest.mark.gen_test(timeout=40)
async def test_two_processes_sharing_redis_hold_the_limit_between_them(
    tmp_path, emulator: AzureEmulator, start_redis, spawn, client
):
    redis_password = "redis-pw-4d2c8e1f6b"
    redis = start_redis(password=redis_password)
    shared_key, burst_key, open_key = (
        "sk-shared-2f8a6c0e9d",
        "sk-burst-8c3e0a7d51",
        "sk-open-b7d1e3a5c2",
    )
    deployments_file = write_deployments_file(
        tmp_path,
        emulator.url,
        [
            {"name": "shared", "key": shared_key, "rpm": 5},
            {"name": "burst", "key": burst_key, "rpm": 5},
            {"name": "admin", "key": ADMIN_KEY, "admin": True},
        ],
        DEPLOYMENT_ENTRIES[:1],
    )
    ports = [free_port(), free_port()]
    servers = [
        spawn(
            server_env(
                tmp_path, HTTP_PORT=str(port), ENDPOINT=emulator.url, KEY=EMULATOR_KEY,
                DEPLOYMENT_NAME=DEPLOYMENT, API_VERSION=API_VERSION, API_KEYS=open_key,
                DEPLOYMENTS_FILE=deployments_file, REDIS_URL=redis.url, MAX_ATTEMPTS="1",
            )
        )
        for port in ports
    ]  # fmt: skip
    for server in servers:
        server.wait_for(r"listening on http://", STARTUP_TIMEOUT)
    urls = [f"http://127.0.0.1:{port}" for port in ports]

    async def ask(index: int, key: str) -> HTTPResponse:
        return await client.fetch(
            urls[index % 2] + "/v1/gpt/chat", method="POST", body=json.dumps({"prompt": f"n {index}"}),
            headers={"Content-Type": "application/json", **auth(key)}, raise_error=False,
        )  # fmt: skip

    responses = [await ask(index, shared_key) for index in range(12)]
    assert [response.code for response in responses] == [200] * 5 + [429] * 7
    # One counter for both processes: the remaining count goes down across them.
    assert [r.headers["x-ratelimit-remaining-requests"] for r in responses[:5]] == [
        "4",
        "3",
        "2",
        "1",
        "0",
    ]
    for refused in responses[5:]:
        assert_envelope_error(refused, 429, "rate_limit_exceeded")
        assert 1 <= int(refused.headers["Retry-After"]) <= 61
    assert len(emulator.requests) == 5
    # All at once, still alternating: the one Redis script admits exactly 5 between them.
    burst = await asyncio.gather(*(ask(index, burst_key) for index in range(12)))
    assert sorted(response.code for response in burst) == [200] * 5 + [429] * 7
    assert sorted(
        r.headers["x-ratelimit-remaining-requests"] for r in burst if r.code == 200
    ) == list("01234")
    assert len(emulator.requests) == 10
    # A key without limits is not held back by the others'.
    assert [(await ask(index, open_key)).code for index in range(2)] == [200, 200]

    # Either process reports the usage both recorded.
    for url in urls:
        report = await client.fetch(url + "/v1/usage", headers=auth(ADMIN_KEY))
        counts = body_of(report)["keys"]
        assert counts["shared"]["gpt-4o"]["requests"] == counts["burst"]["gpt-4o"]["requests"] == 5
        assert counts["key1"]["gpt-4o"]["requests"] == 2

    outputs = []
    for server in servers:
        server.proc.send_signal(signal.SIGTERM)
        outputs.append(server.finish())
        assert server.proc.returncode == 0
    logs = "\n".join(outputs)
    assert logs.count('"route":"gpt_chat"') == 26
    for secret in (shared_key, burst_key, open_key, ADMIN_KEY, EMULATOR_KEY, redis_password):
        assert secret not in logs


# --- Redis going away --------------------------------------------------------------


@pytest.mark.parametrize("mode", ["open", "closed"])
@pytest.mark.gen_test(timeout=20)
async def test_redis_stopped_mid_test_fails_open_or_closed_and_is_counted(
    start_keyed_gateway, redis_server: RedisServer, mode, caplog
):
    caplog.set_level(logging.WARNING, logger="azure-gpt-api.quota")
    gateway = start_keyed_gateway(REDIS_URL=redis_server.url, QUOTA_ON_REDIS_ERROR=mode)
    before = await gateway.post("/v1/gpt/chat", {"prompt": "up"}, headers=auth(RPM_KEY))
    assert before.code == 200 and before.headers["x-ratelimit-remaining-requests"] == "2"
    assert (await gateway.get("/v1/usage", headers=auth(ADMIN_KEY))).code == 200

    redis_server.stop()
    calls_before = len(gateway.emulator.requests)
    after = [
        await gateway.post("/v1/gpt/chat", {"prompt": "down"}, headers=auth(RPM_KEY))
        for _ in range(4)
    ]
    if mode == "open":
        # More than rpm requests, all admitted: no limits while Redis is away.
        assert [response.code for response in after] == [200] * 4
        assert not any("x-ratelimit-remaining-requests" in response.headers for response in after)
        assert len(gateway.emulator.requests) == calls_before + 4
    else:
        for response in after:
            body = assert_envelope_error(response, 503, "quota_unavailable")
            assert "quota store" in body["message"]
        assert len(gateway.emulator.requests) == calls_before
    # A key without limits needs no Redis either way.
    assert (
        await gateway.post("/v1/gpt/chat", {"prompt": "free"}, headers=auth(ALICE_KEY))
    ).code == 200
    assert_envelope_error(
        await gateway.get("/v1/usage", headers=auth(ADMIN_KEY)), 503, "quota_unavailable"
    )

    metrics = samples((await gateway.get("/metrics")).body.decode())
    assert sample(metrics, "gateway_redis_errors_total") >= 5
    warnings = [r.getMessage() for r in caplog.records if r.name == "azure-gpt-api.quota"]
    assert len(warnings) == 1 and f"127.0.0.1:{redis_server.port}" in warnings[0]


# --- the usage report ------------------------------------------------------------------


@pytest.mark.gen_test
async def test_usage_report_counts_every_answer_streamed_or_not(start_keyed_gateway):
    gateway = start_keyed_gateway()
    expected: dict[str, dict[str, dict[str, int]]] = {}

    def expect(key: str, deployment: str, usage: dict[str, int]) -> None:
        counts = expected.setdefault(key, {}).setdefault(
            deployment, {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
        )
        counts["requests"] += 1
        counts["prompt_tokens"] += usage["prompt_tokens"]
        counts["completion_tokens"] += usage["completion_tokens"]

    # Not streamed: the usage the caller sees is what is counted.
    plain = await gateway.post(
        "/v1/chat/completions", chat("one two three", "gpt-4o"), headers=auth(ALICE_KEY)
    )
    assert body_of(plain)["usage"] == echo_usage("one two three")
    expect("alice", "gpt-4o", body_of(plain)["usage"])
    original = await gateway.post("/v1/gpt/chat", {"prompt": "hello"}, headers=auth(BOB_KEY))
    assert body_of(original)["success"] == 1
    expect("bob", "gpt-4o", body_of(original)["usage"])

    # Streamed without include_usage: the caller never sees the usage event, but it is counted.
    for path, body, key, name, deployment, prompt in (
        ("/v1/chat/completions", chat("alpha beta", "gpt-4o-mini", stream=True), ALICE_KEY, "alice", "mini", "alpha beta"),
        ("/v1/gpt/chat", {"prompt": "x y z", "stream": True}, BOB_KEY, "bob", "gpt-4o", "x y z"),
    ):  # fmt: skip
        response = await gateway.post(path, body, headers=auth(key))
        assert response.code == 200
        events = parse_events(response.body)
        assert events[-1] == b"[DONE]"
        assert not any(json.loads(event).get("usage") for event in events[:-1])
        upstream = gateway.emulator.requests[-1]
        assert upstream.json["stream_options"] == {"include_usage": True}
        assert b'"usage":{' in upstream.response_body
        expect(name, deployment, echo_usage(prompt))

    # Streamed with include_usage: the caller gets the event, and the same tokens are counted.
    asked = await gateway.post(
        "/v1/chat/completions",
        chat("a b c d", "gpt-4o-mini", stream=True, stream_options={"include_usage": True}),
        headers=auth(ALICE_KEY, bearer=True),
    )
    events = parse_events(asked.body)
    usage_events = [
        json.loads(event)["usage"] for event in events[:-1] if json.loads(event).get("usage")
    ]
    assert usage_events == [echo_usage("a b c d")]
    expect("alice", "mini", usage_events[0])

    # Refused requests are not in the report.
    assert (
        await gateway.post("/v1/chat/completions", chat("no", "gpt-4o-mini"), headers=auth(BOB_KEY))
    ).code == 403
    assert (
        await gateway.post("/v1/gpt/chat", {"prompt": "no"}, headers=auth(WRONG_KEYS[0]))
    ).code == 401

    report = await gateway.get("/v1/usage", headers=auth(ADMIN_KEY))
    assert report.code == 200
    assert body_of(report) == {"keys": expected}
    assert expected == {
        "alice": {
            "gpt-4o": {"requests": 1, "prompt_tokens": 3, "completion_tokens": 5, "cost_usd": 0.0},
            "mini": {
                "requests": 2,
                "prompt_tokens": 2 + 4,
                "completion_tokens": 4 + 6,
                "cost_usd": 0.0,
            },
        },
        "bob": {
            "gpt-4o": {
                "requests": 2,
                "prompt_tokens": 1 + 3,
                "completion_tokens": 3 + 5,
                "cost_usd": 0.0,
            },
        },
    }

    not_admin = await gateway.get("/v1/usage", headers=auth(ALICE_KEY))
    body = assert_envelope_error(not_admin, 403, "admin_required")
    assert "'alice'" in body["message"]
    assert_envelope_error(await gateway.get("/v1/usage"), 401, "missing_api_key")
    wrong = await gateway.get("/v1/usage", headers=auth(WRONG_KEYS[1], bearer=True))
    assert_envelope_error(wrong, 401, "invalid_api_key")


# --- metrics and health ----------------------------------------------------------------------


@pytest.mark.gen_test
async def test_metrics_after_a_known_sequence_and_the_metrics_key(start_keyed_gateway, quota_clock):
    gateway = start_keyed_gateway(METRICS_KEY=METRICS_KEY)
    prompts = ["one", "two words", "three more words"]
    assert (
        await gateway.post("/v1/gpt/chat", {"prompt": prompts[0]}, headers=auth(RPM_KEY))
    ).code == 200
    assert (
        await gateway.post("/v1/gpt/chat", {"prompt": prompts[1]}, headers=auth(RPM_KEY))
    ).code == 200
    streamed = await gateway.post(
        "/v1/gpt/chat", {"prompt": prompts[2], "stream": True}, headers=auth(RPM_KEY)
    )
    assert streamed.code == 200 and parse_events(streamed.body)[-1] == b"[DONE]"
    assert (
        await gateway.post("/v1/gpt/chat", {"prompt": "over"}, headers=auth(RPM_KEY))
    ).code == 429
    assert (await gateway.post("/v1/gpt/chat", {"prompt": "who"})).code == 401

    for headers in (
        {},
        auth(WRONG_KEYS[0]),
        auth(ADMIN_KEY),
        {"Authorization": f"Basic {METRICS_KEY}"},
    ):
        refused = await gateway.get("/metrics", headers=headers)
        assert_envelope_error(refused, 401, "invalid_metrics_key")
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    by_header = await gateway.get("/metrics", headers=auth(METRICS_KEY))
    response = await gateway.get("/metrics", headers=auth(METRICS_KEY, bearer=True))
    assert by_header.code == response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    found = samples(response.body.decode())

    assert sample(found, "gateway_requests_total", route="gpt_chat", status="200") == 3
    assert sample(found, "gateway_requests_total", route="gpt_chat", status="429") == 1
    assert sample(found, "gateway_requests_total", route="gpt_chat", status="401") == 1
    assert sample(found, "gateway_requests_total", route="metrics", status="401") == 4
    assert sample(found, "gateway_requests_total", route="metrics", status="200") == 1
    usages = [echo_usage(prompt) for prompt in prompts]
    for kind in ("prompt", "completion"):
        assert sample(
            found, "gateway_tokens_total", key="rpm3", deployment="gpt-4o", kind=kind
        ) == sum(usage[f"{kind}_tokens"] for usage in usages)
    assert not any(
        name == "gateway_tokens_total" and ("key", "anonymous") in labels for name, labels in found
    )
    assert sample(found, "gateway_upstream_attempts_total", deployment="gpt-4o", outcome="ok") == 3
    assert sample(found, "gateway_quota_rejections_total", key="rpm3", limit="requests") == 1
    assert sample(found, "gateway_streams_in_flight") == 0
    assert sample(found, "gateway_redis_errors_total") == 0
    assert sample(found, "gateway_request_duration_seconds_count", route="gpt_chat") == 5
    assert (
        sample(found, "gateway_request_duration_seconds_bucket", route="gpt_chat", le="+Inf") == 5
    )
    assert sample(found, "gateway_time_to_first_token_seconds_count", route="gpt_chat") == 1


@pytest.mark.gen_test
async def test_health_routes_need_no_key_and_readyz_turns_503_when_draining(start_gateway):
    gateway = start_gateway(API_KEYS=ALICE_KEY)
    health = await gateway.get("/healthz")
    assert health.code == 200 and body_of(health) == {"status": "ok"}
    ready = await gateway.get("/readyz")
    assert ready.code == 200 and body_of(ready) == {"status": "ready"}

    gateway.server.pipeline.in_flight.draining = True
    draining = await gateway.get("/readyz")
    assert draining.code == 503 and body_of(draining) == {"status": "draining"}
    assert (await gateway.get("/healthz")).code == 200


# --- no key anywhere ------------------------------------------------------------------------


@pytest.mark.gen_test
async def test_no_key_in_logs_metrics_or_answers(start_keyed_gateway, quota_clock, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = start_keyed_gateway(METRICS_KEY=METRICS_KEY)
    seen: list[HTTPResponse] = []

    async def post(path: str, body: Any, headers: dict[str, str] | None = None) -> None:
        seen.append(await gateway.post(path, body, headers=headers or {}))

    async def get(path: str, headers: dict[str, str] | None = None) -> None:
        seen.append(await gateway.get(path, headers=headers or {}))

    for wrong in WRONG_KEYS:
        await post("/v1/gpt/chat", {"prompt": "hi"}, auth(wrong))
        await post("/v1/chat/completions", chat("hi", "gpt-4o"), auth(wrong, bearer=True))
        await get("/v1/usage", auth(wrong))
        await get("/v1/models", auth(wrong, bearer=True))
        await get("/metrics", auth(wrong))
    await post("/v1/gpt/chat", {"prompt": "hi"})
    await post("/v1/chat/completions", chat("hi", "gpt-4o-mini"), auth(BOB_KEY))  # 403
    for _ in range(4):  # 3 x 200, then 429
        await post("/v1/gpt/chat", {"prompt": "count me"}, auth(RPM_KEY))
    await post(
        "/v1/chat/completions",
        chat("stream me", "gpt-4o", stream=True),
        auth(ALICE_KEY, bearer=True),
    )
    await post("/v1/gpt/chat", {"prompt": "three more tokens", "stream": True}, auth(TPM_KEY))
    # 429: the default completion budget, capped at the limit, no longer fits.
    await post("/v1/gpt/chat", {"prompt": "tokens"}, auth(TPM_KEY))
    await get("/v1/models", auth(BOB_KEY))
    await get("/v1/usage", auth(ALICE_KEY))  # 403
    await get("/v1/usage", auth(ADMIN_KEY))
    await get("/metrics", auth(METRICS_KEY))
    await get("/readyz")
    assert sorted({response.code for response in seen}) == [200, 401, 403, 429]

    exposition = seen[-2].body.decode()
    assert "gateway_quota_rejections_total" in exposition
    # The access log went through caplog too, so it was checked as well.
    assert any(record.name == "azure-gpt-api.access" for record in caplog.records)
    everything = "\n".join(
        [caplog.text, exposition]
        + [response.body.decode() for response in seen]
        + [f"{name}: {value}" for response in seen for name, value in response.headers.get_all()]
    )
    for secret in (
        ADMIN_KEY,
        ALICE_KEY,
        BOB_KEY,
        RPM_KEY,
        TPM_KEY,
        METRICS_KEY,
        EMULATOR_KEY,
        *WRONG_KEYS,
    ):
        assert secret not in everything
