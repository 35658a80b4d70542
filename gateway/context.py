"""The collaborators handlers share, built once per application by `make_app`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from jsonschema import Draft202012Validator

from .config import Settings
from .routing import DeploymentPool, Failover
from .upstream import UpstreamClient


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
    validators: dict[str, Draft202012Validator]
    pool: DeploymentPool
    failover: Failover
    in_flight: InFlight = field(default_factory=InFlight)
