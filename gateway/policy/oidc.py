"""Callers' OIDC tokens (Entra ID or any issuer): who a `Bearer <JWT>` stands for.

With `AUTH_OIDC_ISSUER` and `AUTH_OIDC_AUDIENCE` set, a caller may send
`Authorization: Bearer <JWT>` instead of a key. `OidcVerifier` reads the
issuer's discovery document and JWKS through an injected async
`fetch_json(url)` at start-up, keeps the keys, and reads the JWKS again
when a token names an unknown `kid` (a key rotation), at most once per
`refetch_interval`. Only RS256 and ES256 are accepted, `iss` and `aud` must
match exactly, `exp` and `nbf` get at most LEEWAY seconds. Each refusal is a
401 `TokenRejected` whose `reason` (REASONS) is also given to `on_reject`
for the metrics; no message repeats the token.

A valid token is then mapped to a caller-key entry: a `keys:` entry may
carry `oidc: {azp: <app id>}` (or `appid`, `oid`, `sub`: every claim given
must match), parsed by `identities_from_keys`. The first entry in file order
that matches wins; a token that matches none is 403 unless a default entry
(`AUTH_OIDC_DEFAULT_KEY`) is named.

Telling a JWT from an API key (`looks_like_jwt`): a JWT is three base64url
segments joined by dots whose first segment decodes to a JSON object with
an `alg` member. A key is not taken for a JWT unless it has that form,
which a random key does not have.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from gateway.errors import ConfigError, GatewayError

ALGORITHMS = ("RS256", "ES256")
LEEWAY = 60  # seconds of clock difference allowed on exp and nbf
REFETCH_INTERVAL = 60.0  # an unknown kid reads the JWKS again at most this often
REQUIRED_CLAIMS = ("exp", "iss", "aud")
IDENTITY_CLAIMS = ("azp", "appid", "oid", "sub")
DISCOVERY_PATH = "/.well-known/openid-configuration"

# Why a token was refused: the `rule` of the 401 and the metric label.
REASONS = {
    "malformed": "is not a well-formed JWT",
    "unsupported_alg": f"is not signed with {' or '.join(ALGORITHMS)}",
    "unknown_kid": "names a signing key the issuer does not publish",
    "bad_signature": "has a signature that does not verify",
    "expired": "has expired",
    "not_yet_valid": "is not valid yet (nbf or iat in the future)",
    "bad_issuer": "comes from another issuer",
    "bad_audience": "is meant for another audience",
    "missing_claim": f"lacks one of the claims {', '.join(REQUIRED_CLAIMS)}",
}

FetchJson = Callable[[str], Awaitable[Any]]


class TokenRejected(GatewayError):
    """A 401 for a bearer token that is not acceptable, naming the reason only."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(
            401,
            "invalid_token",
            f"The bearer token {REASONS[reason]}" + (f" ({detail})." if detail else "."),
            rule=reason,
            headers={
                "WWW-Authenticate": f'Bearer error="invalid_token", error_description="{reason}"'
            },
        )
        self.reason = reason


class OidcUnavailable(GatewayError):
    """The issuer's keys cannot be read: our failure, so 503 rather than a caller's 401."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(
            503,
            "oidc_unavailable",
            f"Bearer tokens cannot be checked now: reading {url} failed ({reason}).",
            retryable=True,
        )


def looks_like_jwt(value: str) -> bool:
    """True for three base64url segments whose first is a JSON object with `alg`."""
    parts = value.split(".")
    if len(parts) != 3 or not all(parts[:2]):
        return False
    header = _decode_segment(parts[0])
    return isinstance(header, dict) and "alg" in header


def _decode_segment(segment: str) -> Any:
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return json.loads(raw)
    except (binascii.Error, ValueError):
        return None


class OidcVerifier:
    """Checks callers' JWTs against one issuer's published keys and one audience."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        fetch_json: FetchJson,
        *,
        on_reject: Callable[[str], None] | None = None,
        refetch_interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.issuer = issuer
        self.audience = audience
        self._fetch_json = fetch_json
        self._on_reject = on_reject or (lambda reason: None)
        self._refetch_interval = REFETCH_INTERVAL if refetch_interval is None else refetch_interval
        self._clock = clock
        self._jwks_uri: str | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._loaded = False
        self._fetched_at: float | None = None
        self._last_failure: OidcUnavailable | None = None
        self._fetching: asyncio.Future[None] | None = None

    @property
    def ready(self) -> bool:
        """True once the issuer's keys have been read."""
        return self._loaded

    async def start(self) -> None:
        """Read the discovery document and the JWKS; OidcUnavailable if either fails."""
        await self._refresh_keys()

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims if it is acceptable; TokenRejected (401) naming why if not."""
        try:
            return await self._verify(token)
        except TokenRejected as rejected:
            self._on_reject(rejected.reason)
            raise

    async def _verify(self, token: str) -> dict[str, Any]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError:
            raise TokenRejected("malformed") from None
        algorithm = header.get("alg")
        if algorithm not in ALGORITHMS:
            raise TokenRejected("unsupported_alg", f"alg {str(algorithm)[:20]!r}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("unknown_kid", "the header has no kid")
        key = await self._key(kid)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=LEEWAY,
                options={"require": list(REQUIRED_CLAIMS)},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("not_yet_valid") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected("bad_audience") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("bad_issuer") from None
        except jwt.MissingRequiredClaimError as error:
            raise TokenRejected("missing_claim", f"no {error.claim}") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected("unsupported_alg", "the key is for another algorithm") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("bad_signature") from None
        except jwt.InvalidTokenError:
            raise TokenRejected("malformed") from None
        return claims

    async def _key(self, kid: str) -> jwt.PyJWK:
        if kid not in self._keys and self._fetching is not None:
            await asyncio.shield(self._fetching)  # the read in flight (start-up's) may bring it
        if kid not in self._keys:
            if (
                self._fetched_at is None
                or self._clock() - self._fetched_at >= self._refetch_interval
            ):
                await self._refresh_keys()
            elif not self._loaded and self._last_failure is not None:
                raise self._last_failure
            if kid not in self._keys:
                raise TokenRejected("unknown_kid")
        return self._keys[kid]

    async def _refresh_keys(self) -> None:
        """Read the JWKS again; concurrent callers share one read."""
        if self._fetching is None:
            self._fetching = asyncio.ensure_future(self._read_keys())
            self._fetching.add_done_callback(self._reading_done)
        await asyncio.shield(self._fetching)

    def _reading_done(self, fetching: asyncio.Future[None]) -> None:
        self._fetching = None
        if not fetching.cancelled():
            fetching.exception()

    async def _read_keys(self) -> None:
        # A failed read counts as a read for the rate limit: a dead issuer is asked once a minute.
        self._fetched_at = self._clock()
        try:
            if self._jwks_uri is None:
                self._jwks_uri = await self._discover()
            url = self._jwks_uri
            try:
                document = await self._fetch_json(url)
            except Exception as error:
                raise OidcUnavailable(url, _first_line(error)) from None
            self._keys = _signing_keys(document, url)
        except OidcUnavailable as failure:
            self._last_failure = failure
            raise
        self._loaded, self._last_failure = True, None

    async def _discover(self) -> str:
        url = self.issuer.rstrip("/") + DISCOVERY_PATH
        try:
            document = await self._fetch_json(url)
        except Exception as error:
            raise OidcUnavailable(url, _first_line(error)) from None
        if not isinstance(document, dict) or not isinstance(document.get("jwks_uri"), str):
            raise OidcUnavailable(url, "the document has no jwks_uri")
        if document.get("issuer") != self.issuer:
            raise OidcUnavailable(
                url, f"it names the issuer {document.get('issuer')!r}, not {self.issuer!r}"
            )
        return document["jwks_uri"]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _signing_keys(document: Any, url: str) -> dict[str, jwt.PyJWK]:
    """The RS256/ES256 keys of a JWKS, by kid; keys for other uses or algorithms are left out."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise OidcUnavailable(url, "the document has no keys list")
    keys = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError):
            continue
        if key.algorithm_name in ALGORITHMS:
            keys[entry["kid"]] = key
    return keys


# --- mapping a token to a caller-key entry ---------------------------------------


@dataclass(frozen=True)
class OidcIdentity:
    """The claims a `keys:` entry's `oidc:` asks for, and the entry's name."""

    name: str
    claims: tuple[tuple[str, str], ...]

    def matches(self, token_claims: Mapping[str, Any]) -> bool:
        return all(token_claims.get(claim) == value for claim, value in self.claims)


def identities_from_keys(
    entries: Iterable[Any], *, source: str = "DEPLOYMENTS_FILE"
) -> list[OidcIdentity]:
    """The `oidc:` of every `keys:` entry that has one, in file order; ConfigError on a bad one.

    The schema (`keys.schema.json`, `oidc`) allows azp, appid, oid and sub,
    each a non-empty string, at least one; two entries asking for the same
    claims would make the second unreachable, so that is refused too.
    """
    identities: list[OidcIdentity] = []
    problems: list[str] = []
    seen: dict[tuple[tuple[str, str], ...], str] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or "oidc" not in entry:
            continue
        name = entry.get("name")
        label = f"keys[{index}]" + (f" ({name})" if isinstance(name, str) and name else "")
        where = f"{source} {label}"
        raw = entry["oidc"]
        if not isinstance(raw, dict) or not raw:
            problems.append(f"{where}.oidc: must be a mapping of {', '.join(IDENTITY_CLAIMS)}")
            continue
        unknown = sorted(str(claim) for claim in raw if claim not in IDENTITY_CLAIMS)
        bad = sorted(
            str(claim) for claim, value in raw.items() if not isinstance(value, str) or not value
        )
        for claim in unknown:
            problems.append(
                f"{where}.oidc.{claim}: is not a claim that names an identity "
                f"(allowed: {', '.join(IDENTITY_CLAIMS)})"
            )
        for claim in bad:
            problems.append(f"{where}.oidc.{claim}: must be a non-empty string")
        if unknown or bad or not isinstance(name, str) or not name:
            continue
        claims = tuple(sorted(raw.items()))
        if claims in seen:
            problems.append(f"{where}.oidc: asks for the same claims as {seen[claims]}")
            continue
        seen[claims] = label
        identities.append(OidcIdentity(name, claims))
    if problems:
        raise ConfigError(problems)
    return identities


class OidcIdentities:
    """Which caller-key entry a valid token stands for."""

    def __init__(self, identities: Iterable[OidcIdentity], default_name: str | None = None) -> None:
        self.identities = tuple(identities)
        self.default_name = default_name

    def resolve(self, claims: Mapping[str, Any]) -> str:
        """The entry name for `claims`: the first entry that matches, else the default, else 403."""
        for identity in self.identities:
            if identity.matches(claims):
                return identity.name
        if self.default_name is not None:
            return self.default_name
        named = ", ".join(
            f"{claim} {str(claims[claim])[:64]!r}" for claim in IDENTITY_CLAIMS if claim in claims
        )
        raise GatewayError(
            403,
            "identity_not_allowed",
            f"The bearer token is valid, but no caller key is configured for its identity"
            f" ({named or 'no azp, appid, oid or sub'}).",
        )
