"""Azure's remaining counts per deployment, and the choice by priority group, weight and load,
with cool-downs kept by the real DeploymentPool and a driven clock."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from tornado.httputil import HTTPHeaders

from gateway.policy.capacity import (
    DEFAULT_STALE_AFTER,
    CapacityBoard,
    PriorityRouter,
    parse_remaining,
    priority_groups,
)
from gateway.policy.failover import DeploymentPool

from .support.clock import Clock


@dataclass(frozen=True)
class Target:
    name: str
    weight: float = 1.0
    priority: int = 1


PTU = Target("ptu", priority=1)
PAYG_WEST = Target("payg-west", weight=3, priority=2)
PAYG_EAST = Target("payg-east", weight=1, priority=2)
ALL = (PAYG_WEST, PTU, PAYG_EAST)


def remaining(tokens: str | None = None, requests: str | None = None) -> HTTPHeaders:
    headers = HTTPHeaders()
    if tokens is not None:
        headers["X-RateLimit-Remaining-Tokens"] = tokens
    if requests is not None:
        headers["x-ratelimit-remaining-requests"] = requests
    return headers


class Setup:
    """A board, a DeploymentPool keeping cool-downs, and a router over both, on one clock."""

    def __init__(self, *, least_busy: bool = False) -> None:
        self.clock = Clock()
        self.board = CapacityBoard(clock=self.clock)
        self.pool = DeploymentPool(ALL, max_cooldown=60, clock=self.clock, rng=random.Random(1))
        self.spills: list[tuple[int, str]] = []
        self.router = PriorityRouter(
            self.board,
            self.pool.cooling_for,
            least_busy=least_busy,
            on_spill=lambda first, chosen: self.spills.append((first, chosen.name)),
            rng=random.Random(7),
        )

    def choices(self, count: int, tokens: int = 500) -> Counter[str]:
        picked = (self.router.choose(ALL, tokens) for _ in range(count))
        return Counter(d.name if d else "none" for d in picked)


def test_remaining_counts_parse_with_unknowns():
    assert parse_remaining("1234") == 1234
    assert parse_remaining(" 0 ") == 0
    assert parse_remaining("-1") is None
    assert parse_remaining("lots") is None
    assert parse_remaining("12.5") is None
    assert parse_remaining(None) is None


def test_the_board_keeps_each_count_with_its_age():
    clock = Clock()
    board = CapacityBoard(clock=clock)
    board.observe("ptu", remaining(tokens="9000", requests="40"))
    clock.now += 4
    # An answer without the requests header leaves that reading as it was.
    board.observe("ptu", remaining(tokens="-1"))
    assert board.remaining("ptu", "x-ratelimit-remaining-tokens") is None
    assert board.remaining("ptu", "x-ratelimit-remaining-requests") == 40
    row = board.snapshot()["ptu"]
    assert row.remaining_tokens is not None and row.remaining_tokens.value is None
    assert row.remaining_requests is not None and row.remaining_requests.value == 40
    assert board.age(row.remaining_requests) == 4
    assert board.age(row.remaining_tokens) == 0
    clock.now += DEFAULT_STALE_AFTER - 4 + 0.001
    # Stale now: unknown for routing, still shown with its age.
    assert board.remaining("ptu", "x-ratelimit-remaining-requests") is None
    assert board.snapshot()["ptu"].remaining_requests.value == 40


def test_in_flight_is_counted_for_the_block():
    board = CapacityBoard()
    with board.in_flight("a"), board.in_flight("a"):
        assert board.in_flight_count("a") == 2
        try:
            with board.in_flight("b"):
                raise RuntimeError("the attempt failed")
        except RuntimeError:
            pass
        assert board.snapshot()["b"].in_flight == 0
    assert board.in_flight_count("a") == 0


def test_groups_are_ordered_by_priority():
    assert priority_groups(ALL) == [[PTU], [PAYG_WEST, PAYG_EAST]]


def test_an_idle_ptu_gets_every_request():
    setup = Setup()
    setup.board.observe("ptu", remaining(tokens="100000", requests="600"))
    assert setup.choices(300) == Counter({"ptu": 300})
    assert setup.spills == []


def test_a_ptu_cooling_down_spills_to_the_next_group_by_weight_and_comes_back():
    setup = Setup()
    setup.pool.cool_down(PTU, 30.0)  # as the failover does on Azure's 429
    spilled = setup.choices(400)
    assert set(spilled) == {"payg-west", "payg-east"}
    assert 2 < spilled["payg-west"] / spilled["payg-east"] < 4.5  # weights 3 : 1
    assert len(setup.spills) == 400 and {first for first, _ in setup.spills} == {1}
    setup.clock.now += 30
    assert setup.choices(50) == Counter({"ptu": 50})
    assert len(setup.spills) == 400


def test_low_remaining_tokens_spill_and_recovery_brings_requests_back():
    setup = Setup()
    setup.board.observe("ptu", remaining(tokens="300"))
    assert setup.choices(20, tokens=500)["ptu"] == 0
    # A small request still fits where a large one does not.
    assert setup.router.choose(ALL, 200) == PTU
    # A fresh answer says the PTU has room again.
    setup.board.observe("ptu", remaining(tokens="50000"))
    assert setup.choices(20, tokens=500) == Counter({"ptu": 20})


def test_a_low_reading_lapses_and_the_ptu_is_tried_again():
    setup = Setup()
    setup.board.observe("ptu", remaining(tokens="0", requests="0"))
    assert setup.router.choose(ALL, 1) != PTU
    setup.clock.now += DEFAULT_STALE_AFTER + 0.001
    assert setup.router.choose(ALL, 1) == PTU


def test_no_requests_left_spills_whatever_the_tokens():
    setup = Setup()
    setup.board.observe("ptu", remaining(tokens="90000", requests="0"))
    assert setup.router.choose(ALL, 1) in (PAYG_WEST, PAYG_EAST)


def test_without_capacity_anywhere_the_first_ready_group_is_chosen():
    setup = Setup()
    for target in ALL:
        setup.board.observe(target.name, remaining(tokens="10"))
    assert setup.choices(10, tokens=500) == Counter({"ptu": 10})
    setup.pool.cool_down(PTU, 5.0)
    assert set(setup.choices(10, tokens=500)) <= {"payg-west", "payg-east"}


def test_none_only_when_every_candidate_cools_down():
    setup = Setup()
    for target in ALL:
        setup.pool.cool_down(target, 5.0)
    assert setup.router.choose(ALL, 1) is None
    setup.clock.now += 5
    assert setup.router.choose(ALL, 1) == PTU


def test_least_busy_picks_the_fewest_in_flight_within_the_group():
    setup = Setup(least_busy=True)
    setup.pool.cool_down(PTU, 60.0)
    with setup.board.in_flight("payg-west"), setup.board.in_flight("payg-west"):
        with setup.board.in_flight("payg-east"):
            # West is three times the weight but has more in flight.
            assert setup.choices(20) == Counter({"payg-east": 20})
        assert setup.choices(20) == Counter({"payg-east": 20})
    with setup.board.in_flight("payg-east"):
        assert setup.choices(20) == Counter({"payg-west": 20})
    # Equal load: the weights decide.
    both = setup.choices(200)
    assert both["payg-west"] > both["payg-east"] > 0


def test_a_single_group_is_plain_weighted_choice():
    setup = Setup()
    same = (Target("a", weight=1), Target("b", weight=1))
    picked = Counter(setup.router.choose(same).name for _ in range(200))
    assert set(picked) == {"a", "b"} and setup.spills == []
