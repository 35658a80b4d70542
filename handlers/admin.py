"""GET /v1/admin/deployments, /usage and /requests: the web console's data.

The documents' shapes and the errors are described in gateway/ops/admin.py.
They need an admin key; an open gateway (no keys configured) shows them to
anyone, as it shows `/v1/usage`.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.faces import OPENAI_CHAT
from gateway.ops.admin import (
    KeyQuota,
    RecentRequests,
    deployments_document,
    pool_states,
    requests_document,
    requests_limit,
    usage_document,
)
from gateway.policy.quota import RedisQuota

from .base import BaseHandler


class AdminHandler(BaseHandler):
    """An admin document: the caller's key must be an admin key; errors in the OpenAI shape."""

    face = OPENAI_CHAT

    def set_default_headers(self) -> None:
        super().set_default_headers()
        self.set_header("Cache-Control", "no-store")

    def prepare(self) -> None:
        try:
            caller = self.pipeline.keyring.authenticate(self.request.headers)
        except GatewayError as error:
            message = (
                "The admin routes need an admin key: send it as Authorization: Bearer <key> "
                "or in the api-key header."
                if error.code == "missing_api_key"
                else "The admin key is not valid."
            )
            raise GatewayError(401, "invalid_admin_key", message, headers=error.headers) from None
        if caller is not None and not caller.admin:
            raise GatewayError(
                403, "admin_required", f"The key {caller.name!r} is not an admin key."
            )


class AdminDeploymentsHandler(AdminHandler):
    route = "admin_deployments"

    def get(self) -> None:
        attempts = self.pipeline.recent_attempts
        states = pool_states(self.pipeline.pool, attempts)
        self.write_json(deployments_document(states, window_seconds=attempts.window_seconds))


class AdminUsageHandler(AdminHandler):
    route = "admin_usage"

    async def get(self) -> None:
        quota = self.pipeline.quota
        report = await quota.usage_report()
        quotas = []
        for key in self.pipeline.keyring.keys:
            used = await quota.window_usage(key)
            quotas.append(
                KeyQuota(
                    key.name,
                    rpm=key.rpm,
                    tpm=key.tpm,
                    requests_used=used.requests,
                    tokens_used=used.tokens,
                    resets_in_seconds=used.resets_in_seconds,
                )
            )
        scope = "shared" if isinstance(quota, RedisQuota) else "process"
        self.write_json(usage_document(report, scope=scope, quotas=quotas))


class AdminRequestsHandler(AdminHandler):
    route = "admin_requests"

    def initialize(self, recent: RecentRequests) -> None:
        self.recent = recent

    def get(self) -> None:
        try:
            limit = requests_limit(self.get_query_argument("limit", None), self.recent.capacity)
        except ValueError as error:
            raise GatewayError(400, "invalid_limit", str(error), param="limit") from None
        self.write_json(requests_document(self.recent, limit=limit))
