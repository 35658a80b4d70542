"""Callers' OIDC bearer tokens, checked against a local issuer's discovery document and JWKS."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import jwt
import pytest
from tornado.httpclient import AsyncHTTPClient

from gateway.errors import ConfigError, GatewayError
from gateway.policy.keys import keys_from_yaml
from gateway.policy.oidc import (
    REASONS,
    OidcIdentities,
    OidcUnavailable,
    OidcVerifier,
    TokenRejected,
    identities_from_keys,
    looks_like_jwt,
)
from tests.support.clock import Clock
from tests.support.oidc_issuer import AUDIENCE, OidcIssuer, new_key


@pytest.fixture
def issuer(io_loop: Any) -> Any:
    server = OidcIssuer("RS256", "ES256")
    io_loop.run_sync(server.start)
    yield server
    io_loop.run_sync(server.stop)


@pytest.fixture
def fetch_json(io_loop: Any) -> Any:
    http = AsyncHTTPClient(force_instance=True)

    async def fetch(url: str) -> Any:
        response = await http.fetch(url, request_timeout=5)
        return json.loads(response.body)

    yield fetch
    http.close()


@pytest.fixture
def clock() -> Clock:
    """The verifier's monotonic clock, moved by the test, for the refetch rate limit."""
    return Clock()


@pytest.fixture
def rejections() -> list[str]:
    return []


@pytest.fixture
def verifier(issuer, fetch_json, clock, rejections) -> OidcVerifier:
    return OidcVerifier(issuer.url, AUDIENCE, fetch_json, on_reject=rejections.append, clock=clock)


async def rejected(verifier: OidcVerifier, token: str) -> TokenRejected:
    with pytest.raises(TokenRejected) as raised:
        await verifier.verify(token)
    error = raised.value
    assert error.status == 401 and error.code == "invalid_token"
    assert error.error_object()["rule"] == error.reason
    assert error.headers["WWW-Authenticate"].startswith('Bearer error="invalid_token"')
    for part in token.split("."):
        if len(part) > 8:
            assert part not in error.message and part not in json.dumps(error.error_object())
    return error


@pytest.mark.gen_test
async def test_a_valid_token_is_accepted_and_resolved_to_its_entry(issuer, verifier):
    await verifier.start()
    assert verifier.ready and issuer.discovery_requests == 1 and issuer.jwks_requests == 1
    identities = OidcIdentities(
        identities_from_keys(
            [
                {"name": "batch", "key": "k1", "oidc": {"azp": "other-app"}},
                {"name": "reports", "key": "k2", "oidc": {"azp": issuer.claims()["azp"]}},
                {"name": "reports-too", "key": "k3", "oidc": {"oid": issuer.claims()["oid"]}},
            ]
        )
    )
    for key in issuer.keys:  # RS256 and ES256
        claims = await verifier.verify(issuer.sign(key=key))
        assert claims["aud"] == AUDIENCE and claims["iss"] == issuer.url
        assert identities.resolve(claims) == "reports"  # the first entry that matches
    assert issuer.jwks_requests == 1


@pytest.mark.gen_test
async def test_each_bad_token_is_refused_with_its_reason(issuer, verifier, rejections):
    await verifier.start()
    now = int(time.time())
    valid = issuer.sign()
    header, payload, signature = valid.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "azp": "admin-app"}).encode())
    tampered = f"{header}.{forged.rstrip(b'=').decode()}.{signature}"
    cases = {
        "expired": issuer.sign(issuer.claims(exp=now - 61 - 5, iat=now - 600, nbf=now - 600)),
        "not_yet_valid": issuer.sign(issuer.claims(nbf=now + 120, iat=now)),
        "bad_audience": issuer.sign(issuer.claims(aud="api://someone-else")),
        "bad_issuer": issuer.sign(issuer.claims(iss="https://login.example/other/v2.0")),
        "missing_claim": issuer.sign(issuer.claims(exp=None)),
        "unsupported_alg": issuer.unsigned(),
        "unknown_kid": issuer.sign(key=new_key()),  # signed with a key the issuer never published
        "bad_signature": tampered,
        "malformed": "not.a.jwt",
    }
    for reason, token in cases.items():
        error = await rejected(verifier, token)
        assert error.reason == reason, (reason, error.message)
        assert REASONS[reason] in error.message
    hmac_forgery = await rejected(verifier, issuer.hs256_with_public_key())
    assert hmac_forgery.reason == "unsupported_alg"
    assert rejections == [*cases, "unsupported_alg"]
    # Within the leeway, a token just past exp or just before nbf is still good.
    assert await verifier.verify(issuer.sign(issuer.claims(exp=now - 30)))
    assert await verifier.verify(issuer.sign(issuer.claims(nbf=now + 30)))


@pytest.mark.gen_test
async def test_a_rotated_key_is_picked_up_and_refetching_is_rate_limited(issuer, verifier, clock):
    await verifier.start()
    assert issuer.jwks_requests == 1
    rotated = issuer.rotate()
    token = issuer.sign(key=rotated)
    # Just after start-up the JWKS was read a moment ago: the new kid waits for the interval.
    assert (await rejected(verifier, token)).reason == "unknown_kid"
    assert issuer.jwks_requests == 1
    clock.now += 61
    assert (await verifier.verify(token))["iss"] == issuer.url
    assert issuer.jwks_requests == 2
    assert await verifier.verify(token)  # known now: no further read
    unpublished = issuer.sign(key=new_key())
    assert (await rejected(verifier, unpublished)).reason == "unknown_kid"
    assert (await rejected(verifier, unpublished)).reason == "unknown_kid"
    assert issuer.jwks_requests == 2
    clock.now += 61
    assert (await rejected(verifier, unpublished)).reason == "unknown_kid"
    assert issuer.jwks_requests == 3 and issuer.discovery_requests == 1


@pytest.mark.gen_test
async def test_a_removed_key_is_dropped_at_the_next_read(issuer, verifier, clock):
    await verifier.start()
    old = issuer.keys[0]
    token = issuer.sign(key=old)
    assert await verifier.verify(token)
    issuer.keys.remove(old)
    issuer.rotate()
    clock.now += 61
    assert await verifier.verify(issuer.sign())  # the new kid: the JWKS is read again
    assert (await rejected(verifier, token)).reason == "unknown_kid"


@pytest.mark.gen_test
async def test_an_unreachable_issuer_is_a_503_not_the_callers_fault(issuer, fetch_json, clock):
    token = issuer.sign()
    url = issuer.url
    await issuer.stop()
    verifier = OidcVerifier(url, AUDIENCE, fetch_json, clock=clock)
    with pytest.raises(OidcUnavailable) as raised:
        await verifier.start()
    assert raised.value.status == 503 and raised.value.code == "oidc_unavailable"
    assert "/.well-known/openid-configuration" in raised.value.message
    assert not verifier.ready
    with pytest.raises(OidcUnavailable):
        await verifier.verify(token)  # within the interval: the last failure, no new read


@pytest.mark.gen_test
async def test_a_discovery_document_for_another_issuer_is_refused(issuer, fetch_json):
    async def moved(url: str) -> Any:
        return await fetch_json(url.replace("/v2.0", ""))

    verifier = OidcVerifier(issuer.url + "/v2.0", AUDIENCE, moved)
    with pytest.raises(OidcUnavailable) as raised:
        await verifier.start()
    assert "names the issuer" in raised.value.message


def test_jwts_are_told_from_api_keys():
    key = new_key("ES256")
    assert looks_like_jwt(jwt.encode({"sub": "x"}, key.private_key, algorithm="ES256"))
    for key in ("sk-0123456789abcdef", "0123456789abcdef0123456789abcdef", "a.b.c", "x..y", ""):
        assert not looks_like_jwt(key)
    header = base64.urlsafe_b64encode(b'{"typ":"JWT"}').decode().rstrip("=")
    assert not looks_like_jwt(f"{header}.e30.sig")  # a JSON header, but no alg


# --- keys: entries with oidc ---------------------------------------------------------


def test_keys_entries_may_name_an_identity_and_bad_ones_are_config_errors():
    entries = [
        {"name": "reports", "key": "k1", "oidc": {"azp": "app-1"}},
        {"name": "nightly", "key": "k2", "oidc": {"oid": "obj-1", "appid": "app-2"}},
        {"name": "plain", "key": "k3"},
    ]
    assert [key.name for key in keys_from_yaml(entries, {})] == ["reports", "nightly", "plain"]
    identities = identities_from_keys(entries)
    assert [(i.name, i.claims) for i in identities] == [
        ("reports", (("azp", "app-1"),)),
        ("nightly", (("appid", "app-2"), ("oid", "obj-1"))),
    ]
    resolver = OidcIdentities(identities)
    assert resolver.resolve({"oid": "obj-1", "appid": "app-2"}) == "nightly"
    with pytest.raises(GatewayError) as raised:
        resolver.resolve({"oid": "obj-1", "azp": "app-9"})  # needs appid too
    assert raised.value.status == 403 and raised.value.code == "identity_not_allowed"
    assert "azp 'app-9', oid 'obj-1'" in raised.value.message
    assert OidcIdentities(identities, default_name="plain").resolve({"azp": "app-9"}) == "plain"

    with pytest.raises(ConfigError) as schema:
        keys_from_yaml([{"name": "x", "key": "k", "oidc": {"email": "a@b"}}], {})
    assert schema.value.problems == [
        "DEPLOYMENTS_FILE keys[0] (x).oidc: must be a mapping of azp, appid, oid or sub"
        " to non-empty strings"
    ]
    with pytest.raises(ConfigError) as neither:
        keys_from_yaml([{"name": "x"}], {})
    assert neither.value.problems == [
        "DEPLOYMENTS_FILE keys[0] (x): needs a key, or an oidc: identity, or both"
    ]
    (service,) = keys_from_yaml([{"name": "svc", "oidc": {"azp": "app-1"}, "rpm": 5}], {})
    assert service.key is None and service.oidc == (("azp", "app-1"),) and service.rpm == 5
    with pytest.raises(ConfigError) as parsed:
        identities_from_keys(
            [
                {"name": "a", "key": "k1", "oidc": {"email": "a@b"}},
                {"name": "b", "key": "k2", "oidc": {"azp": ""}},
                {"name": "c", "key": "k3", "oidc": {}},
                {"name": "d", "key": "k4", "oidc": {"azp": "app"}},
                {"name": "e", "key": "k5", "oidc": {"azp": "app"}},
            ]
        )
    assert parsed.value.problems == [
        "DEPLOYMENTS_FILE keys[0] (a).oidc.email: is not a claim that names an identity"
        " (allowed: azp, appid, oid, sub)",
        "DEPLOYMENTS_FILE keys[1] (b).oidc.azp: must be a non-empty string",
        "DEPLOYMENTS_FILE keys[2] (c).oidc: must be a mapping of azp, appid, oid, sub",
        "DEPLOYMENTS_FILE keys[4] (e).oidc: asks for the same claims as keys[3] (d)",
    ]
