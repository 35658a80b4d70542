"""Which deployment gets a request, and what happens when it fails.

The choice is gateway/policy/capacity.py's: the lowest priority group with
capacity (not cooling down here, and not short of tokens by Azure's last
remaining counts), by weight or least busy within it.

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
- a request pinned to one deployment (a stored response's follow-up, see
  gateway/policy/affinity.py) is never sent to another: while it cools down
  it is waited for up to `max_retry_wait`, else the answer is a 503 naming it.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Callable, Iterable

from gateway.errors import GatewayError
from gateway.policy.capacity import CapacityBoard, PriorityRouter
from gateway.policy.deployments import Deployment

BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def backoff_delay(failures: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: up to 0.5 s, 1 s, 2 s, ... capped at 30 s."""
    return rng.uniform(BACKOFF_BASE / 2, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1)))


class DeploymentPool:
    """The configured deployments, their cool-downs, and what Azure says each has left."""

    def __init__(
        self,
        deployments: Iterable[Deployment],
        *,
        max_cooldown: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        least_busy: bool = False,
        on_spill: Callable[[int, Deployment], None] = lambda first_priority, chosen: None,
    ) -> None:
        self.deployments = tuple(deployments)
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._rng = rng or random.Random()
        self._cool_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        self.board = CapacityBoard(clock=clock)
        self.router = PriorityRouter(
            self.board, self.cooling_for, least_busy=least_busy, on_spill=on_spill, rng=self._rng
        )

    def candidates(self, model: str | None) -> tuple[Deployment, ...]:
        """Deployments that serve `model`; all of them for None.

        With a single deployment every model name maps to it, so clients that
        hard-code a model name (most tools do) work without configuration.
        """
        if model is None or len(self.deployments) == 1:
            return self.deployments
        return tuple(d for d in self.deployments if d.serves(model))

    def by_name(self, name: str) -> Deployment | None:
        return next((d for d in self.deployments if d.name == name), None)

    def model_names(self) -> list[str]:
        """Every name the deployments answer to, each once, in the order configured."""
        return list(dict.fromkeys(name for d in self.deployments for name in d.names))

    def cooling_for(self, deployment: Deployment) -> float:
        return max(0.0, self._cool_until.get(deployment.name, 0.0) - self._clock())

    def choose(self, candidates: tuple[Deployment, ...], tokens: int = 0) -> Deployment | None:
        """The candidate for a request of an estimated `tokens`; None if all are cooling down."""
        if len(candidates) == 1:  # the usual case: no groups to look at
            return candidates[0] if self.cooling_for(candidates[0]) == 0.0 else None
        return self.router.choose(candidates, tokens)

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
    """The retry rules of this module's docstring, over one pool."""

    def __init__(self, pool: DeploymentPool, *, max_attempts: int, max_retry_wait: float) -> None:
        self.pool = pool
        self.max_attempts = max_attempts
        self.max_retry_wait = max_retry_wait

    def plan(
        self, candidates: tuple[Deployment, ...], tokens: int = 0, *, pinned: bool = False
    ) -> FailoverPlan:
        """The attempts of one request of an estimated `tokens` over `candidates`; `pinned`:
        the one candidate holds what the request is about, so no other may be asked
        (module docstring)."""
        return FailoverPlan(self, candidates, tokens, pinned=pinned)


class FailoverPlan:
    """One request's attempts, driven by its owner::

    while True:
        deployment = await plan.next_deployment()  # raises when no attempt is left
        try:
            answer = await attempt(deployment)
        except GatewayError as error:
            plan.failed(deployment, error)  # raises unless another attempt may fix it
            continue
        plan.succeeded(deployment)
    """

    def __init__(
        self,
        failover: Failover,
        candidates: tuple[Deployment, ...],
        tokens: int = 0,
        *,
        pinned: bool = False,
    ) -> None:
        self._failover = failover
        self._pool = failover.pool
        self.candidates = candidates
        self.pinned = pinned
        self.tokens = tokens
        self.attempts = 0

    async def next_deployment(self) -> Deployment:
        """A ready candidate, after waiting out a short cool-down if every one rests.

        Raises a 429 when every candidate rests for longer than `max_retry_wait`
        (`failed` already raised once `max_attempts` were used up).
        """
        while True:
            deployment = self._pool.choose(self.candidates, self.tokens)
            if deployment is not None:
                self.attempts += 1
                return deployment
            wait = self._pool.earliest_ready(self.candidates)
            if wait > self._failover.max_retry_wait:
                if self.pinned:
                    raise holder_cooling_down(self.candidates[0], wait)
                raise all_cooling_down(wait)
            await asyncio.sleep(wait)

    def failed(self, deployment: Deployment, error: GatewayError) -> None:
        """Count a failed attempt; re-raise `error` unless another attempt may succeed."""
        if not error.retryable:
            raise error
        self._pool.cool_down(deployment, error.retry_after)
        if self.attempts >= self._failover.max_attempts:
            raise error

    def succeeded(self, deployment: Deployment) -> None:
        self._pool.succeeded(deployment)


def all_cooling_down(wait: float) -> GatewayError:
    """429 for a caller when every deployment is cooling down for longer than we wait."""
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        429,
        "all_deployments_busy",
        f"Every Azure OpenAI deployment for this model is rate limited or failing; "
        f"retry after {seconds} s.",
        headers={"Retry-After": str(seconds), "retry-after-ms": str(round(wait * 1000))},
    )


def holder_cooling_down(deployment: Deployment, wait: float) -> GatewayError:
    """503 for a follow-up whose deployment rests for longer than we wait: no other may serve it."""
    seconds = max(1, math.ceil(wait))
    return GatewayError(
        503,
        "deployment_cooling_down",
        f"The stored response is held by the deployment {deployment.name!r}, which is rate "
        f"limited or failing; no other deployment can serve it. Retry after {seconds} s.",
        headers={"Retry-After": str(seconds)},
    )
