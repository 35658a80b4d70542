"""What each deployment has left, and which one a request goes to.

Azure's remaining counts
------------------------
Every Azure answer says how many tokens and requests its deployment can
still take before it answers 429 (`x-ratelimit-remaining-tokens` /
`-requests`). `CapacityBoard.observe` keeps the last of each per deployment,
with the time it came. A negative or unparsable value is unknown (the
Responses API has been seen sending -1); an absent header leaves the last
reading as it was. A reading is believed for `DEFAULT_STALE_AFTER` seconds:
Azure refills a deployment's tokens over its one-minute window, so an older
reading understates what is left, and letting it lapse sends the deployment
a request whose answer brings a fresh one. The board also counts each
deployment's requests in flight.

The choice
----------
Deployments have a `priority` (1 first). `PriorityRouter.choose` looks at
the groups in order and takes the first with a deployment that has
capacity: not cooling down, and neither remaining count known to be below
what the request needs (its token estimate, one request). Within that
group it picks by `weight`, or with `least_busy` the fewest requests in
flight (ties by weight). A request that goes past the first group is a
spill, reported to `on_spill`.

When no deployment has capacity by Azure's numbers but some are not cooling
down, the first group with such a deployment is chosen all the same: the
estimate errs high and the reading ages, so Azure is the judge, and a 429
from it starts a cool-down as any failure does. None is returned only when
every candidate is cooling down.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

DEFAULT_STALE_AFTER = 10.0
DEFAULT_PRIORITY = 1
REMAINING_TOKENS = "x-ratelimit-remaining-tokens"
REMAINING_REQUESTS = "x-ratelimit-remaining-requests"


class Routable(Protocol):
    """What the router needs of a deployment."""

    @property
    def name(self) -> str: ...

    @property
    def weight(self) -> float: ...

    @property
    def priority(self) -> int: ...


D = TypeVar("D", bound=Routable)


def parse_remaining(raw: str | None) -> int | None:
    """A remaining-count header as a count; None for absent, negative or unparsable."""
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


@dataclass(frozen=True)
class Reading:
    """One remaining count from Azure (None: it said "unknown") and when it came."""

    value: int | None
    at: float


@dataclass(frozen=True)
class DeploymentCapacity:
    """One deployment's row in `CapacityBoard.snapshot`; no reading yet is None."""

    remaining_tokens: Reading | None
    remaining_requests: Reading | None
    in_flight: int


class CapacityBoard:
    """Per deployment: Azure's last remaining counts with their age, and requests in flight."""

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        stale_after: float = DEFAULT_STALE_AFTER,
    ) -> None:
        self._clock = clock
        self.stale_after = stale_after
        # header name -> deployment name -> its last reading
        self._readings: dict[str, dict[str, Reading]] = {
            REMAINING_TOKENS: {},
            REMAINING_REQUESTS: {},
        }
        self._in_flight: dict[str, int] = {}

    def observe(self, deployment: str, headers: Mapping[str, str]) -> None:
        """Keep the remaining counts of an answer from `deployment` (each one it has).

        `headers` must look names up case-insensitively (Tornado's
        HTTPHeaders does), as Azure's casing is not fixed.
        """
        now = self._clock()
        for header, readings in self._readings.items():
            raw = headers.get(header)
            if raw is not None:
                readings[deployment] = Reading(parse_remaining(raw), now)

    def remaining(self, deployment: str, header: str) -> int | None:
        """The last count under `header` while it is fresh; None when unknown or stale."""
        reading = self._readings[header].get(deployment)
        if reading is None or self._clock() - reading.at > self.stale_after:
            return None
        return reading.value

    def age(self, reading: Reading) -> float:
        """Seconds since `reading` came."""
        return self._clock() - reading.at

    def has_capacity(self, deployment: str, tokens: int) -> bool:
        """False when a fresh count says `deployment` cannot take a request of `tokens`."""
        requests = self.remaining(deployment, REMAINING_REQUESTS)
        if requests is not None and requests < 1:
            return False
        remaining_tokens = self.remaining(deployment, REMAINING_TOKENS)
        return remaining_tokens is None or remaining_tokens >= tokens

    @contextmanager
    def in_flight(self, deployment: str) -> Iterator[None]:
        """Count a request to `deployment` as in flight for the duration of the block."""
        self._in_flight[deployment] = self._in_flight.get(deployment, 0) + 1
        try:
            yield
        finally:
            self._in_flight[deployment] -= 1

    def in_flight_count(self, deployment: str) -> int:
        return self._in_flight.get(deployment, 0)

    def snapshot(self) -> dict[str, DeploymentCapacity]:
        """Every deployment seen so far, stale readings included, for metrics (see `age`)."""
        tokens, requests = self._readings[REMAINING_TOKENS], self._readings[REMAINING_REQUESTS]
        names = sorted(set(tokens) | set(requests) | set(self._in_flight))
        return {
            name: DeploymentCapacity(
                tokens.get(name), requests.get(name), self._in_flight.get(name, 0)
            )
            for name in names
        }


def priority_groups(candidates: Sequence[D]) -> list[list[D]]:
    """`candidates` grouped by priority, lowest number first, in their given order within."""
    groups: dict[int, list[D]] = {}
    for deployment in candidates:
        groups.setdefault(deployment.priority, []).append(deployment)
    return [groups[priority] for priority in sorted(groups)]


class PriorityRouter(Generic[D]):
    """Picks a deployment by priority group, Azure's remaining counts and weight.

    `cooling_for(deployment)` is the seconds it still cools down (the pool
    keeps cool-downs); `on_spill(first_priority, chosen)` is called when the
    chosen deployment is not in the first group.
    """

    def __init__(
        self,
        board: CapacityBoard,
        cooling_for: Callable[[D], float],
        *,
        least_busy: bool = False,
        on_spill: Callable[[int, D], None] = lambda first_priority, chosen: None,
        rng: random.Random | None = None,
    ) -> None:
        self.board = board
        self._cooling_for = cooling_for
        self.least_busy = least_busy
        self._on_spill = on_spill
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[D], tokens: int = 0) -> D | None:
        """The deployment for a request of an estimated `tokens`; None if all cool down."""
        groups = priority_groups(candidates)
        fallback: list[D] | None = None
        chosen_group: list[D] | None = None
        for group in groups:
            ready = [d for d in group if self._cooling_for(d) == 0.0]
            if not ready:
                continue
            with_capacity = [d for d in ready if self.board.has_capacity(d.name, tokens)]
            if with_capacity:
                chosen_group = with_capacity
                break
            if fallback is None:
                fallback = ready
        pick_from = chosen_group or fallback
        if not pick_from:
            return None
        chosen = self._pick(pick_from)
        if chosen.priority != groups[0][0].priority:
            self._on_spill(groups[0][0].priority, chosen)
        return chosen

    def _pick(self, group: list[D]) -> D:
        if self.least_busy:
            fewest = min(self.board.in_flight_count(d.name) for d in group)
            group = [d for d in group if self.board.in_flight_count(d.name) == fewest]
        if len(group) == 1:
            return group[0]
        return self._rng.choices(group, weights=[d.weight for d in group])[0]
