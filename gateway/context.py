"""The collaborators handlers share, built once per application by `make_app`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from jsonschema import Draft202012Validator

from .config import Deployment, Settings
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
    in_flight: InFlight = field(default_factory=InFlight)

    def deployment_for(self, model: str | None) -> Deployment:
        """The deployment serving `model`; with one deployment, every model name maps to it."""
        return self.settings.deployment

    def model_names(self) -> list[str]:
        return [self.settings.deployment.deployment]
