"""An App Service managed-identity endpoint on 127.0.0.1, for azure-identity to get tokens from.

azure-identity's ManagedIdentityCredential uses it when `IDENTITY_ENDPOINT`
and `IDENTITY_HEADER` are set (and `IDENTITY_SERVER_THUMBPRINT` is not):
`GET <IDENTITY_ENDPOINT>?api-version=2019-08-01&resource=<scope without
/.default>[&client_id=...]` with the header `X-IDENTITY-HEADER: <IDENTITY_HEADER>`,
answered with `{"access_token", "expires_on" (epoch seconds, a string),
"resource", "token_type", "client_id"}` (azure-identity 1.27,
`_credentials/app_service.py` and `_internal/managed_identity_client.py`).

Tokens are opaque random strings that expire `lifetime` seconds after they
are issued; `verify(token)` says whether one was issued here and is still
valid, which is what the emulator's `token_verifier` needs. The endpoint
counts its requests, can answer slowly (`delay`), and can go down (stop
listening: connections are refused) and come back on the same port.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from tornado.httpserver import HTTPServer
from tornado.netutil import bind_sockets
from tornado.web import Application, RequestHandler

API_VERSION = "2019-08-01"
RESOURCE = "https://cognitiveservices.azure.com"
# Variables that would make ManagedIdentityCredential pick another host than App Service.
OTHER_IDENTITY_VARIABLES = (
    "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT", "MSI_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET",
)  # fmt: skip


@dataclass(frozen=True)
class TokenRequest:
    """One request the endpoint answered: what it asked for and what it got."""

    resource: str | None
    client_id: str | None
    status: int


class _TokenHandler(RequestHandler):
    def initialize(self, endpoint: IdentityEndpoint) -> None:
        self.endpoint = endpoint

    async def get(self) -> None:
        endpoint = self.endpoint
        resource = self.get_query_argument("resource", None)
        client_id = self.get_query_argument("client_id", None)
        if endpoint.delay:
            await asyncio.sleep(endpoint.delay)
        if self.request.headers.get("X-IDENTITY-HEADER") != endpoint.header:
            status, body = (
                401,
                {"error": "unauthorized", "error_description": "bad identity header"},
            )
        elif self.get_query_argument("api-version", None) != API_VERSION:
            status, body = 400, {"error": "invalid_request", "error_description": "bad api-version"}
        elif resource != RESOURCE:
            status, body = (
                400,
                {"error": "invalid_resource", "error_description": "unknown resource"},
            )
        else:
            status, body = 200, endpoint.issue(resource, client_id)
        endpoint.requests.append(TokenRequest(resource, client_id, status))
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.write(json.dumps(body))


class IdentityEndpoint:
    """A managed-identity token endpoint that issues short-lived tokens it can later verify."""

    def __init__(self, *, lifetime: float = 3600.0, path: str = "/msi/token") -> None:
        self.lifetime = lifetime
        self.path = path
        self.delay = 0.0
        self.header = secrets.token_hex(16)
        self.requests: list[TokenRequest] = []
        self._issued: dict[str, float] = {}
        self._server: HTTPServer | None = None
        self._port: int | None = None

    @property
    def url(self) -> str:
        if self._port is None:
            raise RuntimeError("the identity endpoint has not been started")
        return f"http://127.0.0.1:{self._port}{self.path}"

    @property
    def environment(self) -> dict[str, str]:
        """The variables that point ManagedIdentityCredential here."""
        return {"IDENTITY_ENDPOINT": self.url, "IDENTITY_HEADER": self.header}

    @property
    def token_requests(self) -> int:
        """How many tokens it has issued."""
        return sum(request.status == 200 for request in self.requests)

    def issue(self, resource: str, client_id: str | None) -> dict[str, str]:
        token = "mi-" + secrets.token_urlsafe(24)
        expires_on = time.time() + self.lifetime
        self._issued[token] = expires_on
        return {
            "access_token": token,
            "expires_on": str(int(expires_on)),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": client_id or "system-assigned",
        }

    def verify(self, token: str) -> bool:
        """True if `token` was issued here and has not expired."""
        expires_on = self._issued.get(token)
        return expires_on is not None and time.time() < expires_on

    def remaining(self, token: str) -> float:
        """Seconds until `token` expires (negative once it has, or if it was never issued)."""
        return self._issued.get(token, 0.0) - time.time()

    def expire_all(self) -> None:
        """Make every token issued so far invalid, as a revocation would."""
        self._issued.clear()

    async def start(self) -> None:
        """Listen on an ephemeral port, or on the port it had before going down."""
        if self._server is not None:
            raise RuntimeError("the identity endpoint is already running")
        sockets = bind_sockets(self._port or 0, "127.0.0.1")
        self._port = sockets[0].getsockname()[1]
        app = Application([(self.path, _TokenHandler, {"endpoint": self})], log_function=_quiet)
        self._server = HTTPServer(app)
        self._server.add_sockets(sockets)

    async def stop(self) -> None:
        """Stop listening and close open connections: new connections are refused."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.stop()
        await server.close_all_connections()


@pytest.fixture(name="endpoint")
def identity_endpoint_fixture(
    io_loop: Any, monkeypatch: pytest.MonkeyPatch
) -> Iterator[IdentityEndpoint]:
    """A running endpoint that ManagedIdentityCredential is pointed at, for this test only."""
    server = IdentityEndpoint()
    io_loop.run_sync(server.start)
    for name in OTHER_IDENTITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in server.environment.items():
        monkeypatch.setenv(name, value)
    yield server
    io_loop.run_sync(server.stop)


def _quiet(handler: RequestHandler) -> None:
    """Keep the endpoint's requests out of tornado.access."""
