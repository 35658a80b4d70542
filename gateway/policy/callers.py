"""Who is calling: an API key, or an OIDC bearer token that stands for a `keys:` entry.

`Callers.authenticate(headers)` is the first step of every API request and
of the routes that look at the caller (/v1/models, /v1/usage). Without an
OIDC issuer (AUTH_OIDC_ISSUER) it is the KeyRing's check. With one, an
`Authorization: Bearer` value that has a JWT's form (`looks_like_jwt`) and
comes without an `api-key` header is checked by the OidcVerifier and served
as the entry its claims resolve to (OidcIdentities), with that entry's name,
limits, models and admin flag; anything else is still a key. A key is never
taken for a JWT: a JWT's first segment is a JSON header, which a random key
is not.

The issuer's keys are read in the background from `start()`, again and
again with backoff until it answers, so a gateway that starts while the
issuer is unreachable becomes ready when it is (`ready`, for /readyz).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

from tornado.httputil import HTTPHeaders

from gateway.policy.keys import CallerKey, KeyRing
from gateway.policy.oidc import OidcIdentities, OidcUnavailable, OidcVerifier, looks_like_jwt

FIRST_RETRY_DELAY = 1.0
MAX_RETRY_DELAY = 60.0

log = logging.getLogger(__name__)


def bearer_jwt(headers: Mapping[str, str]) -> str | None:
    """The JWT in `Authorization: Bearer <JWT>`, unless an `api-key` header is sent too."""
    if not isinstance(headers, HTTPHeaders):
        headers = HTTPHeaders(headers)
    if headers.get("api-key", "").strip():
        return None
    scheme, _, value = headers.get("Authorization", "").strip().partition(" ")
    token = value.strip()
    if scheme.lower() != "bearer" or not looks_like_jwt(token):
        return None
    return token


class Callers:
    """The caller keys, and the OIDC verifier when the gateway takes tokens too."""

    def __init__(
        self,
        keyring: KeyRing,
        verifier: OidcVerifier | None = None,
        identities: OidcIdentities | None = None,
        *,
        first_retry_delay: float = FIRST_RETRY_DELAY,
        max_retry_delay: float = MAX_RETRY_DELAY,
    ) -> None:
        self.keyring = keyring
        self.verifier = verifier
        self.identities = identities or OidcIdentities(())
        self._first_retry_delay = first_retry_delay
        self._max_retry_delay = max_retry_delay
        self._loader: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        """True unless tokens are taken and the issuer's keys have not been read yet."""
        return self.verifier is None or self.verifier.ready

    def start(self) -> None:
        """Read the issuer's keys in the background, retrying until they are read (idempotent)."""
        if self.verifier is not None and self._loader is None:
            self._loader = asyncio.ensure_future(self._load_keys(self.verifier))

    async def close(self) -> None:
        if self._loader is not None:
            self._loader.cancel()
            try:
                await self._loader
            except asyncio.CancelledError:
                pass
            self._loader = None

    async def _load_keys(self, verifier: OidcVerifier) -> None:
        delay = self._first_retry_delay
        while not verifier.ready:
            try:
                await verifier.start()
            except OidcUnavailable as failure:
                log.warning("oidc: %s; trying again in %g s", failure.message, delay)
                await asyncio.sleep(delay)
                delay = min(self._max_retry_delay, delay * 2)
            else:
                log.info("oidc: the signing keys of %s are read", verifier.issuer)

    async def authenticate(self, headers: Mapping[str, str]) -> CallerKey | None:
        """The caller's entry (None on an open gateway); a 401, 403 or 503 GatewayError if none."""
        token = bearer_jwt(headers) if self.verifier is not None else None
        if token is None or self.verifier is None:
            return self.keyring.authenticate(headers)
        claims = await self.verifier.verify(token)
        return self.keyring.named(self.identities.resolve(claims))
