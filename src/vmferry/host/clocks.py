"""The real clock, for the sans-IO layers."""

from __future__ import annotations

import time
from collections.abc import Callable

#: the longest single sleep while pacing: a cancel or a changed cap takes effect this fast
PACE_POLL_S = 0.1


def pace(
    delay: Callable[[], float],
    between: Callable[[], None],
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = PACE_POLL_S,
) -> float:
    """Wait until ``delay()`` (seconds still owed to a bandwidth cap) reaches 0, in sleeps
    of at most ``poll_s``, calling ``between()`` before each one (it may raise to stop the
    wait: a cancel; or change what ``delay()`` answers: a lifted cap).  Returns the time
    slept.  A single capped sleep followed by the next batch would let a batch larger
    than ``poll_s`` x the cap through early: the cap must be honoured in full."""
    slept = 0.0
    owed = delay()
    while owed > 0:
        between()
        step = min(owed, poll_s)
        sleep(step)
        slept += step
        owed = delay()
    return slept


class MonotonicClock:
    def monotonic(self) -> float:
        return time.monotonic()
