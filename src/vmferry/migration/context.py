"""Phases, statistics and the downtime breakdown of one migration.

Statistic names follow QEMU's ``query-migrate`` where one applies (``total-time``,
``ram.dirty-pages-rate`` ...); :meth:`MigrationStats.to_json` produces that shape.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from vmferry.errors import StreamUsageError
from vmferry.machine.vm import VM


class Status(enum.Enum):
    """QEMU's migration status names, for the states vmferry uses."""

    SETUP = "setup"
    ACTIVE = "active"
    DEVICE = "device"  # vCPUs paused, final pass and device state
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.COMPLETED, Status.FAILED, Status.CANCELLED)


#: a source session's moves (``SourceSession._move`` is their one writer): setup ->
#: active -> device -> completed, an offline migration setup -> device, and failed or
#: cancelled from any phase before completed (a session that failed on an exception can
#: still be given up by the operator's cancel)
STATUS_MOVES: dict[Status, frozenset[Status]] = {
    Status.SETUP: frozenset({Status.ACTIVE, Status.DEVICE, Status.FAILED, Status.CANCELLED}),
    Status.ACTIVE: frozenset({Status.DEVICE, Status.FAILED, Status.CANCELLED}),
    Status.DEVICE: frozenset({Status.COMPLETED, Status.FAILED, Status.CANCELLED}),
    Status.COMPLETED: frozenset(),
    Status.FAILED: frozenset({Status.CANCELLED}),
    Status.CANCELLED: frozenset(),
}


@dataclass
class PassRecord:
    """One pre-copy pass."""

    number: int
    pages: int  # pages sent (normal + duplicate)
    normal: int
    duplicate: int
    bytes: int  # stream bytes written in the pass
    seconds: float
    dirty_pages: int  # pages dirtied while the pass ran (found at its end)
    mbps: float  # measured bandwidth, megabits per second (as QEMU reports it)
    dirty_pages_rate: float  # pages per second
    expected_downtime_ms: float
    throttle_pct: int
    downtime_limit_ms: float = 0.0  # the limit the pass's decision used


@dataclass
class Downtime:
    """From source pause to destination resume."""

    total_ms: float = 0.0
    final_ram_ms: float = 0.0  # last RAM pass with vCPUs paused
    state_ms: float = 0.0  # vCPU, component and device state
    #: from the end of the stream to the destination's RESUMED (verification aside): the
    #: sum of the four parts below
    after_stream_ms: float = 0.0
    #: END sent -> the destination has every byte (its receive backlog on the main
    #: connection and the data channels, and the wire's latency)
    drain_ms: float = 0.0
    load_ms: float = 0.0  # the destination loads vCPU, component and device state
    #: LOADED, COMMIT and RESUMED on the wire and the hosts' persists between them
    round_trips_ms: float = 0.0
    adopt_ms: float = 0.0  # the destination adopts the loaded VM and starts it
    verification_ms: float = 0.0  # digest checks on request, guest paused; part of total_ms


def after_stream(ack: Mapping[str, Any], t_end: float, t_loaded: float, now: float,
                 verify_ms: float) -> dict[str, float]:  # fmt: skip
    """The source's END sent (``t_end``) -> RESUMED (``now``), in its measured parts.
    The destination reports its load (``load_ms``, from the END record, including
    ``channels_wait_ms``: waiting for the data channels' last bytes) and its adopt
    (``adopt_ms``); the source saw LOADED come at ``t_loaded`` (0: not seen).  What
    remains before LOADED is the receive backlog (``drain_ms``), after it the round
    trips.  The parts add up to ``after_stream_ms``."""
    t_loaded = t_loaded if t_loaded >= t_end else now
    loading = float(ack.get("load_ms", 0.0))
    waited = float(ack.get("channels_wait_ms", 0.0))
    adopt = float(ack.get("adopt_ms", 0.0))
    return {
        "after_stream_ms": (now - t_end) * 1e3 - verify_ms,
        "drain_ms": (t_loaded - t_end) * 1e3 - loading - verify_ms + waited,
        "load_ms": loading - waited,
        "round_trips_ms": (now - t_loaded) * 1e3 - adopt,
        "adopt_ms": adopt,
    }


@dataclass
class MigrationStats:
    status: Status = Status.SETUP
    setup_time_ms: float = 0.0
    total_time_ms: float = 0.0
    expected_downtime_ms: float = 0.0
    #: the downtime predicted at the stop decision, and what it was made of
    predicted_downtime_ms: float = 0.0
    predicted: dict[str, float] = field(default_factory=dict)
    #: the measured rates the prediction rested on (``PrecopyMeter.inputs``)
    prediction_inputs: dict[str, float] = field(default_factory=dict)
    #: the source's steps with the guest paused, each timed (ms), to set beside the
    #: predicted parts they correspond to
    switchover_parts: dict[str, float] = field(default_factory=dict)
    #: the link's bandwidth as the last pass measured it (0.0: too small to measure)
    link_bandwidth_bps: float = 0.0
    downtime: Downtime = field(default_factory=Downtime)
    ram_total: int = 0
    ram_page_size: int = 0
    #: how the source read the guest's dirty pages (``GuestRam.dirty_tracking``)
    dirty_tracking: str = ""
    ram_transferred: int = 0
    ram_remaining: int = 0
    ram_duplicate: int = 0
    ram_normal: int = 0
    ram_normal_bytes: int = 0
    ram_dirty_pages_rate: float = 0.0
    ram_mbps: float = 0.0
    ram_pages_per_second: float = 0.0
    dirty_sync_count: int = 0
    device_bytes: int = 0
    #: the destination's SWITCHOVER_ACK body (empty: switchover-ack not in use)
    switchover_ack: dict[str, Any] = field(default_factory=dict)
    throttle_pct: int = 0
    passes: list[PassRecord] = field(default_factory=list)
    error: str = ""
    error_step: str = ""
    warnings: list[str] = field(default_factory=list)

    def move(self, to: Status) -> None:
        """The one writer of a source session's status: the move must be in
        :data:`STATUS_MOVES` (StreamUsageError otherwise)."""
        if to is not self.status and to not in STATUS_MOVES[self.status]:
            raise StreamUsageError(f"source session: {self.status.value} -> {to.value} is "
                                   "not a legal move")  # fmt: skip
        self.status = to

    def timed(self, part: str, since: float, now: float) -> float:
        """A step of the switchover took from ``since`` to ``now`` (ms into
        ``switchover_parts``); returns ``now``."""
        self.switchover_parts[part] = (now - since) * 1e3
        return now

    def _prediction_error(self) -> dict[str, float]:
        """How far the prediction was off, in percent of the actual downtime."""
        if self.status is not Status.COMPLETED or not self.predicted or not self.downtime.total_ms:
            return {}
        err = (self.predicted_downtime_ms - self.downtime.total_ms) / self.downtime.total_ms
        return {"downtime-prediction-error-pct": round(err * 100, 1)}

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status.value,
            "setup-time": round(self.setup_time_ms, 3),
            "total-time": round(self.total_time_ms, 3),
            "expected-downtime": round(self.expected_downtime_ms, 3),
            "downtime": round(self.downtime.total_ms, 3),
            "predicted-downtime": round(self.predicted_downtime_ms, 3),
            "predicted-downtime-breakdown": {k: round(v, 3) for k, v in self.predicted.items()},
            "prediction-inputs": {k: round(v, 3) for k, v in self.prediction_inputs.items()},
            "switchover-parts": {k: round(v, 3) for k, v in self.switchover_parts.items()},
            **self._prediction_error(),
            "downtime-breakdown": {k: round(v, 3) for k, v in asdict(self.downtime).items()},
            "ram": {
                "transferred": self.ram_transferred,
                "remaining": self.ram_remaining,
                "total": self.ram_total,
                "duplicate": self.ram_duplicate,
                "normal": self.ram_normal,
                "normal-bytes": self.ram_normal_bytes,
                "dirty-pages-rate": round(self.ram_dirty_pages_rate, 1),
                "mbps": round(self.ram_mbps, 3),
                "dirty-sync-count": self.dirty_sync_count,
                "pages-per-second": round(self.ram_pages_per_second, 1),
                "page-size": self.ram_page_size,
                "dirty-tracking": self.dirty_tracking,
            },
            "device-bytes": self.device_bytes,
            **({"switchover-ack": dict(self.switchover_ack)} if self.switchover_ack else {}),
            "cpu-throttle-percentage": self.throttle_pct,
            "passes": [asdict(p) for p in self.passes],
            "warnings": list(self.warnings),
            **({"error-desc": self.error, "error-step": self.error_step} if self.error else {}),
        }


def state_digests(vm: VM) -> dict[str, str]:
    """RAM, vCPU and per-handler digests: equal on both sides means equal state."""
    out = {"ram": vm.ram.digest(), "vcpu": vm.vcpu_digest()}
    for name, h in vm.handlers.items():
        d = h.state_digest()
        if d is not None:
            out[f"handler:{name}"] = d
    return out


def digest_report(src: dict[str, str], ack: Mapping[str, Any], announced: bool,
                  compare_ms: Callable[[], float]) -> dict[str, Any]:  # fmt: skip
    """The source's digests ``src`` against the destination's (in ``ack``): which differ,
    which of them block the commit (RAM and vCPUs always; a handler's unless the
    pre-flight ``announced`` the destination changes such state), ``compare_ms`` taken
    once compared (see ``SourceSession.verification``)."""
    dst = ack.get("digests", {})
    dst = dict(dst) if isinstance(dst, Mapping) else {}
    report: dict[str, Any] = {
        "requested": True,
        "source": src,
        "destination": dst,
        "ram_equal": src.get("ram") == dst.get("ram"),
        "vcpu_equal": src.get("vcpu") == dst.get("vcpu"),
        "differ": sorted(k for k in set(src) | set(dst) if src.get(k) != dst.get(k)),
        "verified": bool(dst) and src == dst,
        "compare_ms": compare_ms(),
    }
    report["blocking"] = [k for k in report["differ"] if k in ("ram", "vcpu") or not announced]
    report["commit_allowed"] = bool(dst) and not report["blocking"]
    return report
