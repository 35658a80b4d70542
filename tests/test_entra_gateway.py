"""Entra ID through the whole gateway, over real sockets.

To Azure: the gateway's deployments use `auth: {kind: managed_identity}`;
azure-identity's ManagedIdentityCredential gets its tokens from the App
Service identity endpoint of tests/support/identity_endpoint.py, and the
emulator accepts only the tokens that endpoint issued and that are still
valid. From callers: AUTH_OIDC_ISSUER points at the issuer of
tests/support/oidc_issuer.py, whose keys the test generates and signs with.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from emulator import AzureEmulator
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.ops.metrics import Metrics
from gateway.policy import oidc
from gateway.policy.oidc import REASONS
from handlers.app import make_app
from handlers.listeners import GatewayServer
from tests.support.bodies import chat
from tests.support.deployments import write_deployments_file

# pytest finds fixtures by name in the test module.
from tests.support.identity_endpoint import (  # noqa: F401
    IdentityEndpoint,
    identity_endpoint_fixture,
)
from tests.support.metrics import sample, samples
from tests.support.oidc_issuer import AUDIENCE, OidcIssuer, new_key

EMULATOR_KEY = "emulator-key-entra-7d1c"
ALICE_KEY = "alice-key-5be0a1"
SERVICE_APP = "11111111-2222-3333-4444-555555555555"  # the issuer's default azp
WAIT = 20.0  # seconds: the bound on every wait for an event in these tests


class Acquisitions:
    """Counts the gateway's token acquisitions (through its metrics hook), awaitably."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def seen(self) -> None:
        self.count += 1
        self._changed.set()

    async def until(self, count: int) -> None:
        async def reached() -> None:
            while self.count < count:
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(reached(), WAIT)


@pytest.fixture
def acquisitions(monkeypatch: pytest.MonkeyPatch) -> Acquisitions:
    watch = Acquisitions()
    original = Metrics.count_token_acquired

    def count_token_acquired(self: Metrics, credential: str) -> None:
        original(self, credential)
        watch.seen()

    monkeypatch.setattr(Metrics, "count_token_acquired", count_token_acquired)
    return watch


@pytest.fixture
def emulator(io_loop: Any, endpoint: IdentityEndpoint) -> Any:
    emu = AzureEmulator(key=EMULATOR_KEY, deployments=("gpt-4o",), token_verifier=endpoint.verify)
    io_loop.run_sync(emu.start)
    yield emu
    io_loop.run_sync(emu.stop)


@pytest.fixture
def issuer(io_loop: Any) -> Any:
    made = OidcIssuer("RS256", "ES256")
    io_loop.run_sync(made.start)
    yield made
    io_loop.run_sync(made.stop)


@dataclass
class Gateway:
    server: GatewayServer
    client: AsyncHTTPClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.ports['http']}"

    async def chat(self, token: str | None = None, **extra: Any) -> HTTPResponse:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        headers.update(extra.pop("headers", {}))
        return await self.client.fetch(
            self.url + "/v1/chat/completions",
            method="POST",
            body=json.dumps(chat(**extra)),
            headers=headers,
            raise_error=False,
        )

    async def get(self, path: str, **kwargs: Any) -> HTTPResponse:
        return await self.client.fetch(self.url + path, raise_error=False, **kwargs)


@pytest.fixture
def start(io_loop: Any, tmp_path: Path, emulator: AzureEmulator) -> Any:
    """Start a gateway over `deployments` (and `keys`); each is shut down after the test."""
    started: list[GatewayServer] = []
    client = AsyncHTTPClient(force_instance=True, max_clients=100)
    env_file = tmp_path / "empty.env"
    env_file.write_text("")

    def start_gateway(
        deployments: list[dict[str, Any]] | None = None,
        keys: list[dict[str, Any]] | None = None,
        **env: str,
    ) -> Gateway:
        path = write_deployments_file(tmp_path, deployments or [entra(emulator)], keys)
        settings = load_settings(
            {
                "ENV_FILE": str(env_file),
                "HOST": "127.0.0.1",
                "HTTP_PORT": "0",
                "DEPLOYMENTS_FILE": path,
                **env,
            }
        )
        server = GatewayServer(make_app(settings), settings)
        server.start()
        started.append(server)
        return Gateway(server, client)

    yield start_gateway
    client.close()
    for server in started:
        io_loop.run_sync(server.shutdown)


def entra(emulator: AzureEmulator, name: str = "east", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "endpoint": emulator.url,
        "deployment": "gpt-4o",
        "api_version": "2024-10-21",
        "auth": {"kind": "managed_identity"},
        **extra,
    }


def keyed(emulator: AzureEmulator, name: str = "west", **extra: Any) -> dict[str, Any]:
    entry = {**entra(emulator, name), "key": EMULATOR_KEY, **extra}
    del entry["auth"]
    return entry


def bearer_of(emulator: AzureEmulator) -> list[str]:
    """The bearer tokens Azure was sent, in order."""
    return [
        request.headers["authorization"].removeprefix("Bearer ")
        for request in emulator.requests
        if "authorization" in request.headers
    ]


def error_of(response: HTTPResponse) -> dict[str, Any]:
    return json.loads(response.body)["error"]


# --- Entra ID to Azure -------------------------------------------------------------


@pytest.mark.gen_test(timeout=30)
async def test_keyless_requests_are_served_with_the_identitys_token(
    start, endpoint, emulator, caplog
):
    caplog.set_level(logging.INFO)
    gateway = start()
    answer = await gateway.chat()
    assert answer.code == 200, answer.body
    streamed = await gateway.chat(stream=True)
    assert streamed.code == 200 and streamed.body.rstrip().endswith(b"data: [DONE]")

    assert [request.headers.get("api-key") for request in emulator.requests] == [None, None]
    tokens = bearer_of(emulator)
    assert len(tokens) == 2 and len(set(tokens)) == 1 and endpoint.verify(tokens[0])
    assert endpoint.token_requests == 1
    assert "deployment east authenticates with entra: managed identity (system-assigned)" in (
        caplog.text
    )
    ready = await gateway.get("/readyz")
    assert ready.code == 200 and json.loads(ready.body) == {"status": "ready"}
    found = samples((await gateway.get("/metrics")).body)
    credential = {"credential": "managed_identity"}
    assert sample(found, "gateway_entra_tokens_total", **credential, outcome="acquired") == 1


@pytest.mark.gen_test(timeout=40)
async def test_the_token_is_refreshed_before_it_expires_and_no_request_sees_a_401(
    start, endpoint, emulator, acquisitions
):
    endpoint.lifetime = 6.0  # refreshed at half its life
    gateway = start()
    answered = 0
    while acquisitions.count < 2:
        answer = await gateway.chat()
        assert answer.code == 200 and answer.headers["x-upstream-attempts"] == "1"
        answered += 1
        await asyncio.sleep(0.05)  # pacing, so the loop spans the refresh
    await gateway.chat()
    # One Azure request per gateway request: no 401 was answered and retried on the way.
    assert len(emulator.requests) == answered + 1
    tokens = bearer_of(emulator)
    assert len(set(tokens)) == 2 and endpoint.verify(tokens[-1])
    assert endpoint.token_requests == 2


@pytest.mark.gen_test(timeout=30)
async def test_a_cold_start_of_100_concurrent_requests_makes_one_token_request(
    start, endpoint, emulator
):
    endpoint.delay = 0.3  # the first acquisition is still in flight while the requests arrive
    gateway = start()
    answers = await asyncio.gather(*(gateway.chat() for _ in range(100)))
    assert [answer.code for answer in answers] == [200] * 100
    assert endpoint.token_requests == 1
    assert len(set(bearer_of(emulator))) == 1


@pytest.mark.gen_test(timeout=30)
async def test_azure_refusing_the_token_gets_a_new_one_for_the_same_attempt(
    start, endpoint, emulator
):
    gateway = start()
    assert (await gateway.chat()).code == 200
    for stream in (False, True):
        endpoint.expire_all()  # Azure no longer takes the token, though it has not expired
        answer = await gateway.chat(stream=stream)
        assert answer.code == 200, answer.body
        assert answer.headers["x-upstream-attempts"] == "1"
        refused, retried = bearer_of(emulator)[-2:]
        assert refused != retried and endpoint.verify(retried)
    assert endpoint.token_requests == 3
    assert len(emulator.requests) == 5


@pytest.mark.gen_test(timeout=30)
async def test_a_second_401_names_the_identity_and_the_role_to_grant(start, endpoint, emulator):
    gateway = start(MAX_ATTEMPTS="1")
    assert (await gateway.chat()).code == 200
    emulator.token_verifier = lambda token: False  # the identity lost its role
    answer = await gateway.chat()
    assert answer.code == 502
    error = error_of(answer)
    assert error["code"] == "upstream_configuration"
    assert "managed identity (system-assigned)" in error["message"]
    assert "Cognitive Services OpenAI User" in error["message"]
    assert len(emulator.requests) == 3  # the first request, then one 401 retried once


@pytest.mark.gen_test(timeout=40)
async def test_identity_endpoint_down_is_a_clear_502_readyz_503_then_recovery(
    start, endpoint, emulator, acquisitions
):
    await endpoint.stop()
    gateway = start()
    answer = await gateway.chat()
    assert answer.code == 502
    error = error_of(answer)
    assert error["code"] == "upstream_auth_unavailable"
    assert error["message"].startswith(
        "The gateway could not get an Entra ID token for Azure OpenAI from managed identity"
        " (system-assigned): "
    )
    assert emulator.requests == []
    waiting = await gateway.get("/readyz")
    assert waiting.code == 503
    assert json.loads(waiting.body) == {
        "status": "starting",
        "waiting_for": ["an Entra ID token for east"],
    }

    await endpoint.start()
    await acquisitions.until(1)
    assert (await gateway.get("/readyz")).code == 200
    assert (await gateway.chat()).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_deployment_without_a_token_fails_over_like_a_refused_connection(
    start, endpoint, emulator
):
    await endpoint.stop()
    # The Entra deployment is all but sure to be tried first.
    gateway = start([entra(emulator, weight=1000000), keyed(emulator, weight=0.001)])
    answer = await gateway.chat()
    assert answer.code == 200 and answer.headers["x-upstream-attempts"] == "2"
    assert [request.headers.get("api-key") for request in emulator.requests] == [EMULATOR_KEY]
    found = samples((await gateway.get("/metrics")).body)
    assert (
        sample(
            found,
            "gateway_upstream_attempts_total",
            deployment="east",
            outcome="upstream_auth_unavailable",
        )
        == 1
    )
    failed = sample(
        found, "gateway_entra_tokens_total", credential="managed_identity", outcome="failed"
    )
    assert failed >= 1


@pytest.mark.gen_test(timeout=30)
async def test_no_token_text_in_logs_metrics_or_answers(start, endpoint, emulator, caplog):
    caplog.set_level(logging.DEBUG)
    gateway = start()
    shown = [await gateway.chat(), await gateway.chat(stream=True)]
    endpoint.expire_all()
    shown.append(await gateway.chat())
    await endpoint.stop()
    endpoint.expire_all()
    shown += [await gateway.chat(), await gateway.get("/readyz"), await gateway.get("/metrics")]
    tokens = set(bearer_of(emulator))
    assert len(tokens) == 2
    texts = [caplog.text] + [
        answer.body.decode() + json.dumps(dict(answer.headers)) for answer in shown
    ]
    for text in texts:
        for secret in (*tokens, endpoint.header):
            assert secret not in text


# --- OIDC tokens from callers --------------------------------------------------------


CALLER_KEYS = [
    {"name": "billing", "oidc": {"azp": SERVICE_APP}, "rpm": 2},
    {"name": "alice", "key": ALICE_KEY},
]


@pytest.fixture
def oidc_gateway(start, emulator, issuer) -> Callable[..., Gateway]:
    def start_with(keys: list[dict[str, Any]] = CALLER_KEYS, **env: str) -> Gateway:
        return start(
            [keyed(emulator)],
            keys,
            AUTH_OIDC_ISSUER=issuer.url,
            AUTH_OIDC_AUDIENCE=AUDIENCE,
            **env,
        )

    return start_with


@pytest.mark.gen_test(timeout=30)
async def test_a_callers_token_is_served_under_its_entrys_name_and_limits(
    oidc_gateway, issuer, emulator, caplog
):
    caplog.set_level(logging.INFO)
    gateway = oidc_gateway()
    token = issuer.sign()
    first = await gateway.chat(token)
    assert first.code == 200, first.body
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert '"key":"billing"' in caplog.text
    assert emulator.requests[-1].headers["api-key"] == EMULATOR_KEY  # never the caller's token
    assert "authorization" not in emulator.requests[-1].headers
    assert (await gateway.chat(token)).code == 200
    over = await gateway.chat(token)
    assert over.code == 429 and "'billing'" in error_of(over)["message"]

    assert (await gateway.chat(headers={"api-key": ALICE_KEY})).code == 200
    stranger = await gateway.chat(issuer.sign(issuer.claims(azp="99999999-0000")))
    assert stranger.code == 403 and error_of(stranger)["code"] == "identity_not_allowed"
    usage = await gateway.get("/v1/usage", headers={"Authorization": f"Bearer {token}"})
    assert usage.code == 403 and "'billing'" in json.loads(usage.body)["error"]["message"]
    assert (await gateway.get("/readyz")).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_token_matching_no_entry_gets_the_default_entry(oidc_gateway, issuer):
    gateway = oidc_gateway(AUTH_OIDC_DEFAULT_KEY="alice")
    answer = await gateway.chat(issuer.sign(issuer.claims(azp="99999999-0000")))
    assert answer.code == 200 and "x-ratelimit-limit-requests" not in answer.headers


def _tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["azp"] = "22222222-0000"
    raw = json.dumps(claims, separators=(",", ":")).encode()
    return ".".join([header, base64.urlsafe_b64encode(raw).rstrip(b"=").decode(), signature])


@pytest.mark.gen_test(timeout=30)
async def test_each_bad_token_is_a_401_naming_its_reason(oidc_gateway, issuer, emulator):
    gateway = oidc_gateway()
    now = int(time.time())
    bad = {
        "expired": issuer.sign(issuer.claims(iat=now - 900, nbf=now - 900, exp=now - 120)),
        "bad_audience": issuer.sign(issuer.claims(aud="api://another-app")),
        "bad_issuer": issuer.sign(issuer.claims(iss="https://login.example.com/other/v2.0")),
        "unsupported_alg": issuer.unsigned(),
        "unknown_kid": issuer.sign(key=new_key()),
        "bad_signature": _tampered(issuer.sign()),
    }
    for reason, token in bad.items():
        answer = await gateway.chat(token)
        assert answer.code == 401, reason
        assert error_of(answer)["message"].startswith(f"The bearer token {REASONS[reason]}")
        assert f'error_description="{reason}"' in answer.headers["WWW-Authenticate"]
    key_confusion = await gateway.chat(issuer.hs256_with_public_key())
    assert key_confusion.code == 401
    assert 'error_description="unsupported_alg"' in key_confusion.headers["WWW-Authenticate"]
    assert emulator.requests == []

    found = samples((await gateway.get("/metrics")).body)
    rejections = {reason: 2 if reason == "unsupported_alg" else 1 for reason in bad}
    for reason, count in rejections.items():
        assert sample(found, "gateway_jwt_rejections_total", reason=reason) == count


@pytest.mark.gen_test(timeout=30)
async def test_a_rotated_signing_key_is_picked_up_without_a_restart(
    oidc_gateway, issuer, monkeypatch
):
    # Rotation itself, not the once-a-minute limit (tests/test_oidc.py has that).
    monkeypatch.setattr(oidc, "REFETCH_INTERVAL", 0.0)
    gateway = oidc_gateway()
    assert (await gateway.chat(issuer.sign())).code == 200
    assert issuer.jwks_requests == 1
    issuer.rotate("ES256")
    answer = await gateway.chat(issuer.sign())
    assert answer.code == 200, answer.body
    assert issuer.jwks_requests == 2


@pytest.mark.gen_test(timeout=30)
async def test_without_the_issuers_keys_readyz_is_503_and_tokens_wait_for_them(
    oidc_gateway, issuer
):
    await issuer.stop()  # its port now refuses connections
    gateway = oidc_gateway()
    waiting = await gateway.get("/readyz")
    assert waiting.code == 503
    assert json.loads(waiting.body)["waiting_for"] == ["the OIDC issuer's signing keys"]
    answer = await gateway.chat(issuer.sign())
    assert answer.code == 503 and error_of(answer)["code"] == "oidc_unavailable"
    assert (await gateway.chat(headers={"api-key": ALICE_KEY})).code == 200  # keys still work


# --- configuration -----------------------------------------------------------------


def settings_of(tmp_path: Path, **env: str) -> Any:
    env_file = tmp_path / "none.env"
    env_file.write_text("")
    return load_settings({"ENV_FILE": str(env_file), **env})


def test_azure_auth_is_the_single_deployment_rule(tmp_path):
    single = {"ENDPOINT": "https://x.openai.azure.com", "DEPLOYMENT_NAME": "gpt-4o",
              "API_VERSION": "2024-10-21"}  # fmt: skip
    (deployment,) = settings_of(tmp_path, **single, AZURE_AUTH="managed_identity").deployments
    assert deployment.key is None and deployment.entra is not None
    assert deployment.entra.description == "entra: managed identity (system-assigned)"
    (keyed_one,) = settings_of(tmp_path, **single, KEY="k").deployments
    assert keyed_one.entra is None and keyed_one.key is not None
    with pytest.raises(ConfigError) as both:
        settings_of(tmp_path, **single, KEY="k", AZURE_AUTH="entra")
    assert both.value.problems == [
        "KEY: must be empty when AZURE_AUTH=entra (Entra ID is used, not a key)"
    ]


def test_the_oidc_settings_are_checked_together(tmp_path):
    path = write_deployments_file(
        tmp_path,
        [
            {
                "name": "e",
                "endpoint": "https://e.openai.azure.com",
                "deployment": "d",
                "api_version": "2024-10-21",
                "auth": "entra",
            }
        ],  # fmt: skip
        CALLER_KEYS,
    )
    settings = settings_of(
        tmp_path,
        DEPLOYMENTS_FILE=path,
        AUTH_OIDC_ISSUER="https://login.microsoftonline.com/t/v2.0",
        AUTH_OIDC_AUDIENCE=AUDIENCE,
    )
    assert settings.deployments[0].entra is not None and settings.deployments[0].key is None
    with pytest.raises(ConfigError) as raised:
        settings_of(
            tmp_path,
            DEPLOYMENTS_FILE=path,
            AUTH_OIDC_ISSUER="login.microsoftonline.com",
            AUTH_OIDC_DEFAULT_KEY="nobody",
        )
    assert raised.value.problems == [
        "AUTH_OIDC_ISSUER: must be the issuer's URL (https://...), as its tokens' iss says",
        "AUTH_OIDC_DEFAULT_KEY: needs AUTH_OIDC_ISSUER",
        "AUTH_OIDC_DEFAULT_KEY: must name an entry of keys: in DEPLOYMENTS_FILE "
        "('nobody' is not one)",
    ]
    with pytest.raises(ConfigError) as unservable:
        settings_of(
            tmp_path,
            DEPLOYMENTS_FILE=write_deployments_file(
                tmp_path, [keyed_entry()], [{"name": "alice", "key": ALICE_KEY}]
            ),
            AUTH_OIDC_ISSUER="https://issuer.example.com",
        )
    assert unservable.value.problems == [
        "AUTH_OIDC_AUDIENCE: is required when AUTH_OIDC_ISSUER is set",
        "AUTH_OIDC_ISSUER: no keys: entry has oidc: and AUTH_OIDC_DEFAULT_KEY is unset, "
        "so no token could be served",
    ]


def keyed_entry() -> dict[str, Any]:
    return {"name": "w", "endpoint": "https://w.openai.azure.com", "deployment": "d",
            "api_version": "2024-10-21", "key": "k"}  # fmt: skip
