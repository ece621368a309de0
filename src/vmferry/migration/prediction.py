"""The downtime predicted at the stop decision, sans-IO: what the host measures about
the link (:class:`LinkProbe`) and how the parts are added up (:func:`predict`).

Each part is a quantity measured during this migration where the session can measure
it (the bandwidth of the last pass, stopping the guest, reading the dirty log) or by the
host (the bytes still in flight, a round trip, its own persists); see
docs/performance.md.  The parts are a dict, so a term (a device's load time measured
in pre-copy, say) is one more key.
"""

from __future__ import annotations

from typing import Protocol

#: the switchover after the last byte: END -> LOADED -> COMMIT -> RESUMED
SWITCHOVER_ROUND_TRIPS = 1.5


class LinkProbe(Protocol):
    """What the host measures about the link, for the downtime prediction."""

    def in_flight_bytes(self) -> int:
        """Bytes handed to the link that the destination has not consumed yet."""
        ...

    def round_trip_s(self) -> float:
        """One request-reply round trip to the destination host, measured."""
        ...

    def bandwidth_bps(self) -> float:
        """Bytes per second measured on this link before (0.0: never)."""
        ...

    def fixed_switchover_s(self) -> float:
        """What the switchover costs beyond moving bytes, as measured here: the host's
        own bookkeeping with the guest paused (persisting the job's steps) and the
        destination's load and resume as the last migration to it reported them."""
        ...

    def settle(self) -> None:
        """Just before the stop, with the guest still running: wait (bounded) until the
        destination has taken what was already sent, so that its receive backlog is not
        drained with the guest paused."""
        ...


def predict(link: LinkProbe | None, ram_bytes: int, remaining: int, bandwidth: float,
            stop_s: float) -> dict[str, float]:  # fmt: skip
    """The downtime's parts (ms) at the stop decision: what is left (``ram_bytes`` of
    dirty pages, and device state: ``remaining`` minus those) and what is still in
    flight, at the ``bandwidth`` just measured; the switchover's round trips as the host
    measured them; ``stop_s``: stopping the guest and the final dirty-log read, as
    measured in pre-copy."""
    bw = max(bandwidth, 1.0)
    in_flight = link.in_flight_bytes() if link is not None else 0
    rtt = link.round_trip_s() if link is not None else 0.0
    fixed = link.fixed_switchover_s() if link is not None else 0.0
    return {
        "final_ram_ms": ram_bytes / bw * 1e3,
        "state_ms": (remaining - ram_bytes) / bw * 1e3,
        "in_flight_ms": in_flight / bw * 1e3,
        "switchover_ms": SWITCHOVER_ROUND_TRIPS * rtt * 1e3,
        "stop_ms": stop_s * 1e3,
        # the hosts' bookkeeping and the destination's load and resume (measured)
        "fixed_ms": fixed * 1e3,
    }
