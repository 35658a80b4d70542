"""Upstream auth: api-key, and Entra tokens from azure-identity against a local identity endpoint.

The tokens come from azure-identity's own async ManagedIdentityCredential,
pointed at `tests/support/identity_endpoint.py` through IDENTITY_ENDPOINT
and IDENTITY_HEADER, and are sent to the emulator, which accepts only the
tokens that endpoint issued and that have not expired.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from azure.identity import aio as identity
from tornado.httpclient import AsyncHTTPClient, HTTPResponse

from emulator import AzureEmulator, Fault
from emulator.errors import permission_denied, token_refused
from gateway.errors import ConfigError, GatewayError, map_upstream_status
from gateway.policy.deployments import expand_variables, schema_problems
from gateway.secret import Secret
from gateway.upstream.auth import (
    ApiKeyAuth,
    EntraOptions,
    TokenSources,
    TokenUnavailable,
    auth_from_settings,
    make_credential,
    parse_auth_entry,
)

# pytest finds fixtures by name in the test module.
from tests.support.identity_endpoint import (  # noqa: F401
    IdentityEndpoint,
    identity_endpoint_fixture,
)

VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o"
WAIT = 10.0  # seconds: the bound on every wait for an event in these tests


class Recorder:
    """The metric hooks: every acquisition and failure by credential label, with events to await."""

    def __init__(self) -> None:
        self.acquired: list[str] = []
        self.failed: list[str] = []
        self.probe: Callable[[], Any] | None = None  # called at each acquisition, into `probed`
        self.probed: list[Any] = []
        self._events: list[tuple[list[str], int, asyncio.Event]] = []

    def on_acquired(self, label: str) -> None:
        self.acquired.append(label)
        if self.probe is not None:
            self.probed.append(self.probe())
        self._wake()

    def on_failed(self, label: str) -> None:
        self.failed.append(label)
        self._wake()

    def _wake(self) -> None:
        for calls, count, event in self._events:
            if len(calls) >= count:
                event.set()

    async def until(self, calls: list[str], count: int) -> None:
        """Wait until `calls` (self.acquired or self.failed) has `count` entries."""
        event = asyncio.Event()
        self._events.append((calls, count, event))
        self._wake()
        await asyncio.wait_for(event.wait(), WAIT)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def sources(io_loop: Any, endpoint: IdentityEndpoint, recorder: Recorder) -> Any:
    made = TokenSources(
        on_acquired=recorder.on_acquired, on_failed=recorder.on_failed, first_retry_delay=0.1
    )
    yield made
    io_loop.run_sync(made.close)


@pytest.fixture
def emulator(io_loop: Any, endpoint: IdentityEndpoint) -> Any:
    emu = AzureEmulator(
        key="emulator-key", deployments=(DEPLOYMENT,), token_verifier=endpoint.verify
    )
    io_loop.run_sync(emu.start)
    yield emu
    io_loop.run_sync(emu.stop)


@pytest.fixture
def client(io_loop: Any) -> Any:
    http = AsyncHTTPClient(force_instance=True)
    yield http
    http.close()


async def chat(
    emulator: AzureEmulator, client: AsyncHTTPClient, headers: dict[str, str]
) -> HTTPResponse:
    return await client.fetch(
        f"{emulator.url}/openai/deployments/{DEPLOYMENT}/chat/completions?api-version={VERSION}",
        method="POST",
        body=json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        headers={"Content-Type": "application/json", **headers},
        raise_error=False,
    )


MANAGED = EntraOptions(kind="managed_identity")


# --- api-key ---------------------------------------------------------------------


@pytest.mark.gen_test
async def test_api_key_auth_sends_the_key_and_a_401_is_final(emulator, client):
    auth = ApiKeyAuth(Secret("emulator-key"))
    assert auth.ready and auth.description == "api-key"
    headers = await auth.headers()
    assert headers == {"api-key": "emulator-key"}
    assert (await chat(emulator, client, headers)).code == 200
    assert auth.reject(headers) is False


# --- Entra tokens from the identity endpoint ---------------------------------------


@pytest.mark.gen_test
async def test_a_token_is_acquired_and_azure_accepts_it(
    sources, endpoint, emulator, client, recorder
):
    auth = sources.auth(EntraOptions(kind="managed_identity", client_id="0000-user-assigned"))
    assert not auth.ready
    assert auth.description == "entra: managed identity (client_id 0000-user-assigned)"
    headers = await auth.headers()
    scheme, token = headers["Authorization"].split(" ")
    assert scheme == "Bearer" and endpoint.verify(token)
    assert auth.ready and sources.ready
    assert endpoint.requests[-1].client_id == "0000-user-assigned"
    assert endpoint.requests[-1].resource == "https://cognitiveservices.azure.com"
    assert recorder.acquired == ["managed_identity:0000-user-assigned"]

    response = await chat(emulator, client, headers)
    assert response.code == 200, response.body
    assert await auth.headers() == headers
    assert endpoint.token_requests == 1


@pytest.mark.gen_test
async def test_the_emulator_refuses_other_bearer_tokens_in_azures_shape(emulator, client):
    for headers in ({"Authorization": "Bearer forged"}, {}):
        response = await chat(emulator, client, headers)
        assert response.code == 401
        assert json.loads(response.body) == token_refused() and "error" not in token_refused()
    wrong_key = await chat(emulator, client, {"api-key": "wrong", "Authorization": "Bearer forged"})
    assert wrong_key.code == 401 and json.loads(wrong_key.body)["error"]["code"] == "401"
    # The gateway maps Azure's envelope-less 401 like the others: our credentials, not the caller's.
    mapped = map_upstream_status(401, {}, json.dumps(token_refused()).encode(), max_cooldown=60)
    assert mapped.status == 502 and mapped.code == "upstream_configuration"


@pytest.mark.gen_test
async def test_a_cold_start_of_100_requests_makes_one_token_request(
    sources, endpoint, emulator, client
):
    endpoint.delay = 0.2  # the acquisition is still in flight while the others arrive
    deployments = [sources.auth(MANAGED) for _ in range(3)]  # three deployments, one identity
    headers = await asyncio.gather(*(deployments[n % 3].headers() for n in range(100)))
    assert endpoint.token_requests == 1
    assert len({h["Authorization"] for h in headers}) == 1
    assert len(sources.sources) == 1
    assert (await chat(emulator, client, headers[0])).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_the_token_is_refreshed_before_it_expires_and_no_caller_waits(
    sources, endpoint, emulator, client, recorder
):
    endpoint.lifetime = 6.0
    auth = sources.auth(MANAGED)
    first = (await auth.headers())["Authorization"].removeprefix("Bearer ")
    recorder.probe = lambda: endpoint.remaining(first)
    seen: set[str] = set()
    refreshed = asyncio.ensure_future(recorder.until(recorder.acquired, 2))
    while not refreshed.done():
        asked_before = len(endpoint.requests)
        headers = await auth.headers()
        assert len(endpoint.requests) == asked_before  # this caller made no token request
        seen.add(headers["Authorization"])
        assert (await chat(emulator, client, headers)).code == 200  # never a 401 on the way
        await asyncio.sleep(0.05)
    await refreshed
    # The second token came at about half the first one's life (6 s), well before it expired.
    assert len(recorder.probed) == 1 and recorder.probed[0] > 1.0
    second = (await auth.headers())["Authorization"].removeprefix("Bearer ")
    assert second != first and endpoint.verify(second)
    assert endpoint.token_requests == 2
    assert seen <= {f"Bearer {first}", f"Bearer {second}"}


@pytest.mark.gen_test
async def test_after_azure_refuses_the_token_a_new_one_serves_the_retry(
    sources, endpoint, emulator, client
):
    auth = sources.auth(MANAGED)
    other_deployment = sources.auth(MANAGED)
    headers = await auth.headers()
    endpoint.expire_all()  # Azure no longer accepts it, though it has not expired
    refused = await chat(emulator, client, headers)
    assert refused.code == 401 and json.loads(refused.body) == token_refused()

    assert auth.reject(headers) is True
    assert (
        other_deployment.reject(headers) is True
    )  # a second 401 for the same token: one new token
    retry = await auth.headers()
    assert retry != headers
    assert (await chat(emulator, client, retry)).code == 200
    assert await other_deployment.headers() == retry
    assert endpoint.token_requests == 2


@pytest.mark.gen_test
async def test_a_permission_denied_401_also_gets_one_retry_with_a_new_token(
    sources, endpoint, emulator, client
):
    auth = sources.auth(MANAGED)
    headers = await auth.headers()
    emulator.add_fault(Fault(status=401, body=permission_denied()))
    refused = await chat(emulator, client, headers)
    assert refused.code == 401 and json.loads(refused.body) == permission_denied()
    assert auth.reject(headers)
    retry = await auth.headers()
    assert retry != headers and (await chat(emulator, client, retry)).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_identity_endpoint_down_is_a_clear_502_and_recovery_follows(
    sources, endpoint, emulator, client, recorder
):
    await endpoint.stop()
    auth = sources.auth(MANAGED)
    with pytest.raises(TokenUnavailable) as raised:
        await auth.headers()
    error = raised.value
    assert isinstance(error, GatewayError)
    assert error.status == 502 and error.code == "upstream_auth_unavailable" and error.retryable
    assert error.message.startswith(
        "The gateway could not get an Entra ID token for Azure OpenAI from managed identity"
        " (system-assigned): "
    )
    assert "127.0.0.1" in error.reason  # the reason says what failed: the connection
    assert not auth.ready and not sources.ready
    assert recorder.failed and set(recorder.failed) == {"managed_identity"}

    await recorder.until(recorder.failed, 2)  # the background retries go on, with backoff
    await endpoint.start()
    await recorder.until(recorder.acquired, 1)
    assert auth.ready and sources.ready
    assert (await chat(emulator, client, await auth.headers())).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_a_failed_refresh_keeps_the_valid_token_and_retries(
    sources, endpoint, emulator, client, recorder
):
    endpoint.lifetime = 6.0
    auth = sources.auth(MANAGED)
    headers = await auth.headers()
    await endpoint.stop()
    await recorder.until(recorder.failed, 1)  # the refresh at half-life failed
    assert auth.ready
    assert await auth.headers() == headers
    assert (await chat(emulator, client, headers)).code == 200
    await endpoint.start()
    await recorder.until(recorder.acquired, 2)
    renewed = await auth.headers()
    assert renewed != headers and (await chat(emulator, client, renewed)).code == 200


@pytest.mark.gen_test(timeout=30)
async def test_no_token_text_in_logs_errors_or_reprs(sources, endpoint, client, recorder, caplog):
    caplog.set_level(logging.DEBUG)
    endpoint.lifetime = 4.0
    auth = sources.auth(MANAGED)
    first = await auth.headers()
    await recorder.until(recorder.acquired, 2)  # a refresh, with a new credential
    second = await auth.headers()
    auth.reject(second)
    await endpoint.stop()
    with pytest.raises(TokenUnavailable) as raised:
        await auth.headers()
    tokens = [h["Authorization"].removeprefix("Bearer ") for h in (first, second)]
    assert len(set(tokens)) == 2
    logged = caplog.text
    assert "gave no token" in logged and "gave a token valid for" in logged
    shown = [logged, str(raised.value), json.dumps(raised.value.error_object())]
    shown += [repr(source) for source in sources.sources] + [repr(vars(s)) for s in sources.sources]
    for text in shown:
        for secret in (*tokens, endpoint.header):
            assert secret not in text


@pytest.mark.gen_test
async def test_close_closes_the_credentials_and_stops_refreshing(endpoint, recorder):
    made = TokenSources(on_acquired=recorder.on_acquired)
    auth = made.auth(MANAGED)
    await auth.headers()
    source = made.sources[0]
    refresher = source._refresher
    await made.close()
    assert refresher is not None and refresher.done()


# --- configuration -----------------------------------------------------------------


def deployments_document(**entry: Any) -> dict[str, Any]:
    base = {"name": "east", "endpoint": "https://east.openai.azure.com", "deployment": "gpt-4o",
            "api_version": "2024-10-21"}  # fmt: skip
    return {"deployments": [{**base, **entry}]}


def problems(**entry: Any) -> list[str]:
    return schema_problems(
        deployments_document(**entry), "deployments.schema.json", "DEPLOYMENTS_FILE"
    )


def test_the_deployments_schema_takes_auth_instead_of_key():
    assert problems(key="k") == []
    assert problems(auth="entra") == []
    assert problems(auth={"kind": "managed_identity", "client_id": "abc"}) == []
    assert problems(auth={"kind": "client_secret", "tenant_id": "t", "client_id": "c",
                          "client_secret": "${SP_SECRET}"}) == []  # fmt: skip
    assert problems() == [
        "DEPLOYMENTS_FILE deployments[0] (east): needs one of the fields 'key', 'auth'"
    ]
    assert problems(key="k", auth="entra") == problems()
    assert problems(auth="entra-id") == [
        'DEPLOYMENTS_FILE deployments[0] (east).auth: must be "entra" (got "entra-id")'
    ]
    literal = problems(
        auth={
            "kind": "client_secret",
            "tenant_id": "t",
            "client_id": "c",
            "client_secret": "s3cr3t",
        }
    )
    assert len(literal) == 1 and literal[0].startswith(
        "DEPLOYMENTS_FILE deployments[0] (east).auth.client_secret: must match the pattern"
    )
    assert problems(auth={"kind": "azure_cli", "client_id": "c"})
    assert problems(auth={"kind": "client_secret", "tenant_id": "t"})
    assert problems(auth={"kind": "imds"})


def test_parse_auth_entry_gives_the_identity_and_names_every_problem():
    environ = {"SP_SECRET": "s3cr3t", "MI_CLIENT": "abc"}

    def from_env(raw: str) -> tuple[str, list[str]]:
        return expand_variables(raw, environ)

    def from_nothing(raw: str) -> tuple[str, list[str]]:
        return expand_variables(raw, {})

    where = "DEPLOYMENTS_FILE deployments[0] (east)"
    assert parse_auth_entry("entra", from_env, where) == EntraOptions()
    assert parse_auth_entry(
        {"kind": "managed_identity", "client_id": "${MI_CLIENT}"}, from_env, where
    ) == (EntraOptions(kind="managed_identity", client_id="abc"))
    secret_entry = {"kind": "client_secret", "tenant_id": "t", "client_id": "c"}
    principal = parse_auth_entry({**secret_entry, "client_secret": "${SP_SECRET}"}, from_env, where)
    assert principal.client_secret == Secret("s3cr3t")
    assert "s3cr3t" not in repr(principal) and "s3cr3t" not in principal.description
    assert principal.description == "entra: service principal (client_id c, tenant t)"
    assert principal.label == "client_secret:c"

    with pytest.raises(ConfigError) as raised:
        parse_auth_entry(
            {"kind": "client_secret", "client_id": "c", "client_secret": "${UNSET}", "scope": "x"},
            from_nothing,
            where,
        )
    assert raised.value.problems == [
        f"{where}.auth.scope: is not an option of client_secret"
        " (allowed: client_id, client_secret, tenant_id)",
        f"{where}.auth.tenant_id: is required for client_secret",
        f"{where}.auth.client_secret: ${{UNSET}} is not set in the environment",
    ]
    with pytest.raises(ConfigError) as raised:
        parse_auth_entry({"kind": "client_secret", "tenant_id": "t", "client_id": "c",
                          "client_secret": "s3cr3t"}, from_nothing, where)  # fmt: skip
    assert raised.value.problems == [
        f"{where}.auth.client_secret: must be ${{VAR}}, not the secret itself"
    ]
    assert "s3cr3t" not in str(raised.value)
    with pytest.raises(ConfigError):
        parse_auth_entry({"kind": "imds"}, from_nothing, where)


@pytest.mark.gen_test
async def test_one_source_per_distinct_identity(endpoint):
    made = TokenSources()
    for client_id in (None, None, "a", "a"):
        made.auth(EntraOptions(kind="managed_identity", client_id=client_id))
    assert len(made.sources) == 2
    await made.close()


def test_the_single_deployment_rule():
    assert auth_from_settings("", Secret("k")) is None
    assert auth_from_settings("key", Secret("k")) is None
    assert auth_from_settings("entra", None) == EntraOptions()
    assert auth_from_settings("ENTRA", Secret("")) == EntraOptions()
    assert auth_from_settings("managed_identity", None, "abc") == EntraOptions(
        "managed_identity", "abc"
    )
    assert auth_from_settings("azure_cli", None, "abc") == EntraOptions("azure_cli")
    for azure_auth, key, problem in (
        ("", None, "KEY: is required (or set DEPLOYMENTS_FILE, or AZURE_AUTH=entra for Entra ID)"),
        (
            "entra",
            Secret("k"),
            "KEY: must be empty when AZURE_AUTH=entra (Entra ID is used, not a key)",
        ),
        ("client_secret", None, "AZURE_AUTH: must be key, entra,"),
        ("token", None, "AZURE_AUTH: must be key, entra,"),
    ):
        with pytest.raises(ConfigError) as raised:
            auth_from_settings(azure_auth, key)
        assert raised.value.problems[0].startswith(problem)


@pytest.mark.gen_test
async def test_each_kind_builds_its_azure_identity_credential(monkeypatch):
    monkeypatch.setenv("AZURE_FEDERATED_TOKEN_FILE", "/nonexistent/token")
    expected = {
        EntraOptions(): identity.DefaultAzureCredential,
        EntraOptions(client_id="c"): identity.DefaultAzureCredential,
        EntraOptions("managed_identity", "c"): identity.ManagedIdentityCredential,
        EntraOptions("workload_identity", "c", "t"): identity.WorkloadIdentityCredential,
        EntraOptions("client_secret", "c", "t", Secret("s")): identity.ClientSecretCredential,
        EntraOptions("azure_cli", tenant_id="t"): identity.AzureCliCredential,
    }
    for options, kind in expected.items():
        credential = make_credential(options)
        assert type(credential) is kind
        await credential.close()
