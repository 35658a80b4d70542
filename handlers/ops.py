"""Operator routes: health for load balancers, metrics for Prometheus, usage for admins."""

from __future__ import annotations

import hmac

from gateway.errors import GatewayError
from gateway.policy.keys import presented_key

from .base import BaseHandler


class HealthHandler(BaseHandler):
    """GET /healthz: the process answers."""

    route = "healthz"

    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    """GET /readyz: configuration loaded and not draining; 503 once shutdown has begun,
    so a load balancer stops sending before the listener closes, and 503 while an Entra
    deployment has no token yet or the OIDC issuer's keys are unread."""

    route = "readyz"

    def get(self) -> None:
        waiting_for = self.pipeline.waiting_for()
        if self.pipeline.in_flight.draining:
            self.set_status(503)
            self.write_json({"status": "draining"})
        elif waiting_for:
            self.set_status(503)
            self.write_json({"status": "starting", "waiting_for": waiting_for})
        else:
            self.write_json({"status": "ready"})


class MetricsHandler(BaseHandler):
    """GET /metrics: Prometheus text format; open unless METRICS_KEY is set."""

    route = "metrics"

    def get(self) -> None:
        required = self.pipeline.settings.metrics_key
        if required is not None:
            presented = presented_key(self.request.headers) or ""
            if not hmac.compare_digest(presented.encode(), required.reveal().encode()):
                raise GatewayError(
                    401,
                    "invalid_metrics_key",
                    "The metrics need METRICS_KEY in the api-key header or as a Bearer token.",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        body, content_type = self.pipeline.metrics.render()
        self.set_header("Content-Type", content_type)
        self.finish(body)


class UsageHandler(BaseHandler):
    """GET /v1/usage: tokens and requests per key and deployment, for admin keys.

    An open gateway (no keys configured) shows it to anyone, as it shows everything.
    """

    route = "usage"

    async def get(self) -> None:
        caller = await self.pipeline.callers.authenticate(self.request.headers)
        if caller is not None and not caller.admin:
            raise GatewayError(
                403, "admin_required", f"The key {caller.name!r} is not an admin key."
            )
        self.write_json(await self.pipeline.quota.usage_report())
