"""The collaborators handlers share, built once per application by `make_app`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Mapping

from gateway.ops.accesslog import write_access_log
from gateway.config import Settings
from gateway.policy.deployments import Deployment
from gateway.policy.keys import KeyRing
from gateway.ops.metrics import Metrics
from gateway.policy.quota import QuotaStore
from gateway.policy.failover import DeploymentPool, Failover
from gateway.upstream.client import UpstreamClient
from gateway.validation import BodyValidator


class InFlight:
    """Counts requests being served, so shutdown can wait for them to drain."""

    def __init__(self) -> None:
        self.count = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.count += 1
        self._idle.clear()

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """True if every request finished within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True


@dataclass
class GatewayContext:
    settings: Settings
    upstream: UpstreamClient
    validators: dict[str, BodyValidator]
    pool: DeploymentPool
    failover: Failover
    keyring: KeyRing
    quota: QuotaStore
    metrics: Metrics
    in_flight: InFlight = field(default_factory=InFlight)

    def request_finished(self, record: Mapping[str, Any]) -> None:
        """Log a finished request and count it in the metrics."""
        write_access_log(record, self.settings.log_format)
        ttft_ms = record.get("ttft_ms")
        self.metrics.count_request(
            record["route"],
            record["status"],
            record["duration_ms"] / 1000,
            None if ttft_ms is None else ttft_ms / 1000,
        )

    def count_attempt(self, deployment: Deployment, outcome: str) -> None:
        self.metrics.count_attempt(deployment.name, outcome)
