"""The bandwidth cap is honoured in full (issue 13, item 7: a 64 MiB migration capped at
3 MiB/s finished at 7.3 MiB/s: the sender slept at most 0.5 s after each 4 MiB batch)."""

from __future__ import annotations

import pytest

from vmferry.host.clocks import PACE_POLL_S, pace
from vmferry.migration.runs import BATCH_BYTES

MIB = 1 << 20


class Link:
    """A capped sender's clock and byte count, as SourceSession.pacing_delay sees them."""

    def __init__(self, cap_mib: float) -> None:
        self.cap, self.now, self.sent = cap_mib * MIB, 0.0, 0

    def delay(self) -> float:
        return max(0.0, (self.sent - self.cap * self.now) / self.cap)

    def sleep(self, seconds: float) -> None:
        assert 0 < seconds <= PACE_POLL_S
        self.now += seconds


@pytest.mark.parametrize("cap_mib", [1, 3, 4, 64])
def test_issue13_item7_cap_holds_for_batches_bigger_than_one_sleep(cap_mib: float) -> None:
    link = Link(cap_mib)
    for _ in range(16):  # 64 MiB in 4 MiB batches
        pace(link.delay, lambda: None, link.sleep)
        link.sent += BATCH_BYTES
    pace(link.delay, lambda: None, link.sleep)
    assert link.sent / link.now == pytest.approx(link.cap, rel=1e-6)


def test_between_runs_before_every_sleep_and_can_stop_the_wait() -> None:
    link = Link(1)
    link.sent = 4 * MIB  # 4 s owed
    calls: list[float] = []

    class Cancelled(Exception):
        pass

    def between() -> None:
        calls.append(link.now)
        if link.now >= 1.0 - 1e-9:
            raise Cancelled

    with pytest.raises(Cancelled):
        pace(link.delay, between, link.sleep)
    assert len(calls) == int(1.0 / PACE_POLL_S) + 1 and link.now == pytest.approx(1.0)


def test_a_lifted_cap_ends_the_wait_at_once() -> None:
    link = Link(1)
    link.sent = 4 * MIB

    def lift() -> None:
        if link.now >= 0.3 - 1e-9:
            link.cap = float("inf")

    slept = pace(link.delay, lift, link.sleep)
    assert slept == pytest.approx(0.3 + PACE_POLL_S)


def test_nothing_owed_means_no_sleep() -> None:
    def never(seconds: float) -> None:
        raise AssertionError("slept")

    assert pace(lambda: 0.0, lambda: None, never) == 0.0
