"""An OIDC issuer on 127.0.0.1: discovery document, JWKS, and tokens signed in the test.

Keys are generated when the issuer is built (RSA 2048 for RS256, P-256 for
ES256); `rotate()` adds a new one under a new `kid`, which is then the one
`sign()` uses. `unsigned()` and `hs256_with_public_key()` build the two
classic forgeries by hand, since PyJWT refuses to make them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

AUDIENCE = "api://azure-gpt-api"
TOKEN_LIFETIME = 300


@dataclass
class SigningKey:
    kid: str
    algorithm: str
    private_key: Any

    @property
    def public_pem(self) -> bytes:
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        algorithm = jwt.get_algorithm_by_name(self.algorithm)
        public = json.loads(algorithm.to_jwk(self.private_key.public_key()))
        return {**public, "kid": self.kid, "use": "sig"}


def new_key(algorithm: str = "RS256") -> SigningKey:
    if algorithm == "RS256":
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif algorithm == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"no key type for {algorithm}")
    return SigningKey(kid=uuid.uuid4().hex[:16], algorithm=algorithm, private_key=private)


def _segment(obj: Any) -> str:
    raw = json.dumps(obj, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class _DiscoveryHandler(RequestHandler):
    def initialize(self, issuer: OidcIssuer) -> None:
        self.issuer = issuer

    def get(self) -> None:
        self.issuer.discovery_requests += 1
        self.write({"issuer": self.issuer.url, "jwks_uri": self.issuer.url + "/keys"})


class _KeysHandler(RequestHandler):
    def initialize(self, issuer: OidcIssuer) -> None:
        self.issuer = issuer

    def get(self) -> None:
        self.issuer.jwks_requests += 1
        self.write({"keys": [key.jwk() for key in self.issuer.keys]})


class OidcIssuer:
    """Discovery and JWKS over HTTP, and signing helpers for the tokens a test needs."""

    def __init__(self, *algorithms: str) -> None:
        self.keys = [new_key(algorithm) for algorithm in algorithms or ("RS256",)]
        self.discovery_requests = 0
        self.jwks_requests = 0
        self._server: HTTPServer | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the issuer has not been started")
        return f"http://127.0.0.1:{self._port}"

    async def start(self) -> None:
        sockets = bind_sockets(0, "127.0.0.1")
        self._port = sockets[0].getsockname()[1]
        args = {"issuer": self}
        app = Application(
            [
                (r"/\.well-known/openid-configuration", _DiscoveryHandler, args),
                (r"/keys", _KeysHandler, args),
            ],
            log_function=lambda handler: None,
        )
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.stop()
            await server.close_all_connections()

    def rotate(self, algorithm: str = "RS256") -> SigningKey:
        """Publish a new key; `sign()` uses it from now on."""
        self.keys.append(new_key(algorithm))
        return self.keys[-1]

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Claims of a valid token for AUDIENCE, valid for TOKEN_LIFETIME seconds from now."""
        now = int(time.time())
        claims = {
            "iss": self.url,
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + TOKEN_LIFETIME,
            "azp": "11111111-2222-3333-4444-555555555555",
            "oid": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "sub": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        }
        claims.update(overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def sign(self, claims: dict[str, Any] | None = None, *, key: SigningKey | None = None,
             headers: dict[str, Any] | None = None) -> str:  # fmt: skip
        """A token signed with `key` (default: the newest), its kid in the header."""
        key = key or self.keys[-1]
        return jwt.encode(
            claims if claims is not None else self.claims(),
            key.private_key,
            algorithm=key.algorithm,
            headers={"kid": key.kid, **(headers or {})},
        )

    def unsigned(self, claims: dict[str, Any] | None = None) -> str:
        """An `alg: none` token with no signature."""
        header = {"alg": "none", "typ": "JWT", "kid": self.keys[-1].kid}
        return f"{_segment(header)}.{_segment(claims or self.claims())}."

    def hs256_with_public_key(self, claims: dict[str, Any] | None = None) -> str:
        """HS256 keyed with the published public key (PEM): the key-confusion forgery."""
        key = self.keys[-1]
        header = {"alg": "HS256", "typ": "JWT", "kid": key.kid}
        signing_input = f"{_segment(header)}.{_segment(claims or self.claims())}"
        signature = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
        return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
