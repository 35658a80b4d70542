"""A clock the test moves by hand, for the stores, limiters and verifiers that take `clock=`."""

from __future__ import annotations


class Clock:
    """Reads `now`; a test sets or advances it, so windows and expiries need no sleeping."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
