"""The downtime-overrun warning names what the verification pause took of it."""

from __future__ import annotations

from vmferry.host.outcome import downtime_overrun


def test_overrun_names_the_verification_pause() -> None:
    stats = {"status": "completed", "downtime": 309.4,
             "downtime-breakdown": {"total_ms": 309.4, "verification_ms": 159.2}}
    assert downtime_overrun(stats, 300) == (
        "downtime 309.4 ms exceeded the limit of 300 ms (verification took 159.2 ms of it)")


def test_no_overrun_within_the_limit_or_unfinished() -> None:
    assert downtime_overrun({"status": "completed", "downtime": 12.0}, 300) is None
    assert downtime_overrun({"status": "active", "downtime": 900.0}, 300) is None
    assert downtime_overrun({"status": "completed", "downtime": 301.0}, 300) == (
        "downtime 301.0 ms exceeded the limit of 300 ms")
