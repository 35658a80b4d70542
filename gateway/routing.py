"""Which deployment gets a request, and what happens when it fails.

Retry rules (before any byte reached the caller, never after):
- retryable: 429, 408, 500, 502, 503, 504, a refused or reset connection, a
  first-byte or request timeout. The failing deployment cools down for
  Azure's `retry-after-ms`, else `retry-after`, else an exponential backoff
  with jitter, never longer than `max_cooldown`, and the next attempt goes
  at once to another deployment.
- when every candidate is cooling down, wait for the earliest if that is
  within `max_retry_wait`, else answer 429 with a Retry-After.
- at most `max_attempts` upstream attempts; then the last failure is the answer.
- never retried: anything else (400 content filter, 401, 403, 404, ...).
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Awaitable, Callable, Iterable, TypeVar

from .deployments import Deployment
from .errors import GatewayError

T = TypeVar("T")

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def backoff_delay(failures: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: up to 0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return rng.uniform(BACKOFF_BASE / 2, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1)))


class DeploymentPool:
    """The configured deployments, their weights and their cool-downs."""

    def __init__(
        self,
        deployments: Iterable[Deployment],
        *,
        max_cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.deployments = tuple(deployments)
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._rng = rng or random.Random()
        self._cool_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def candidates(self, model: str | None) -> tuple[Deployment, ...]:
        """Deployments that serve `model`; all of them for None.

        With a single deployment every model name maps to it, so clients that
        hard-code a model name (most tools do) work without configuration.
        """
        if model is None or len(self.deployments) == 1:
            return self.deployments
        return tuple(d for d in self.deployments if d.serves(model))

    def model_names(self) -> list[str]:
        names: list[str] = []
        for deployment in self.deployments:
            for name in (deployment.name, deployment.deployment, *deployment.models):
                if name not in names:
                    names.append(name)
        return names

    def cooling_for(self, deployment: Deployment) -> float:
        return max(0.0, self._cool_until.get(deployment.name, 0.0) - self._clock())

    def choose(self, candidates: tuple[Deployment, ...]) -> Deployment | None:
        """A ready candidate, picked by weight; None if all are cooling down."""
        ready = [d for d in candidates if self.cooling_for(d) == 0.0]
        if len(ready) <= 1:
            return ready[0] if ready else None  # no draw: the usual case is one deployment
        return self._rng.choices(ready, weights=[d.weight for d in ready])[0]

    def earliest_ready(self, candidates: tuple[Deployment, ...]) -> float:
        """Seconds until the first of `candidates` stops cooling down."""
        return min(self.cooling_for(d) for d in candidates)

    def cool_down(self, deployment: Deployment, seconds: float | None) -> None:
        """Rest `deployment` for `seconds` (None: the backoff's), at most `max_cooldown`.

        The cap bounds what an upstream header can do: a `retry-after-ms` of
        99999999999 would otherwise take a deployment out for three years.
        """
        failures = self._failures.get(deployment.name, 0) + 1
        self._failures[deployment.name] = failures
        delay = seconds if seconds is not None else backoff_delay(failures, self._rng)
        self._cool_until[deployment.name] = self._clock() + min(delay, self.max_cooldown)

    def succeeded(self, deployment: Deployment) -> None:
        self._failures.pop(deployment.name, None)


class Failover:
    """Runs one request's attempts across a pool, by the rules in this module's docstring."""

    def __init__(self, pool: DeploymentPool, *, max_attempts: int, max_retry_wait: float) -> None:
        self.pool = pool
        self.max_attempts = max_attempts
        self.max_retry_wait = max_retry_wait

    async def run(
        self,
        candidates: tuple[Deployment, ...],
        attempt: Callable[[Deployment], Awaitable[T]],
        *,
        on_attempt: Callable[[Deployment, str], None] = lambda deployment, outcome: None,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> T:
        """Call `attempt(deployment)` until one succeeds or the rules say stop.

        `on_attempt(deployment, outcome)` reports each attempt ("ok", or the
        failure's code) for the access log and metrics.
        """
        last_error: GatewayError | None = None
        attempts = 0
        while attempts < self.max_attempts and not cancelled():
            deployment = self.pool.choose(candidates)
            if deployment is None:
                wait = self.pool.earliest_ready(candidates)
                if wait > self.max_retry_wait:
                    raise all_cooling_down(wait)
                await asyncio.sleep(wait)
                continue
            attempts += 1
            try:
                result = await attempt(deployment)
            except GatewayError as error:
                on_attempt(deployment, error.code)
                if not error.retryable:
                    raise
                self.pool.cool_down(deployment, error.retry_after)
                last_error = error
                continue
            on_attempt(deployment, "ok")
            self.pool.succeeded(deployment)
            return result
        if last_error is None:
            raise GatewayError(499, "client_closed_request", "The caller went away.")
        raise last_error


def all_cooling_down(wait: float) -> GatewayError:
    """429 for a caller when every deployment is cooling down for longer than we wait."""
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        429,
        "all_deployments_busy",
        f"Every Azure OpenAI deployment for this model is rate limited or failing; "
        f"retry after {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )
