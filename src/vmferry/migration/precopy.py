"""When to stop iterating and switch over: QEMU's pre-copy convergence policy.

After every pass the source knows how many bytes are dirty and how fast it can send.
``expected downtime = remaining bytes / bandwidth``; once that is within the downtime
limit the source pauses the guest and sends the rest.  If it does not get there within
``max_passes`` passes, auto-converge throttles the guest: ``initial`` percent, then
``increment`` more every further pass, up to ``maximum`` (QEMU's cpu-throttle-initial 20,
cpu-throttle-increment 10, max-cpu-throttle 99).
"""

from __future__ import annotations

from dataclasses import dataclass

from vmferry.errors import ConfigError


@dataclass(frozen=True)
class ConvergencePolicy:
    downtime_limit_s: float = 0.300
    max_passes: int = 5
    auto_converge: bool = True
    throttle_initial: int = 20
    throttle_increment: int = 10
    throttle_max: int = 99
    #: give up (fail) after this many passes; None: keep going (QEMU never gives up)
    give_up_after: int | None = 1000

    def __post_init__(self) -> None:
        if self.downtime_limit_s <= 0:
            raise ConfigError("downtime limit must be positive")
        if self.max_passes < 1:
            raise ConfigError("max_passes must be at least 1")
        if not 0 < self.throttle_initial <= self.throttle_max <= 99:
            raise ConfigError("throttle settings must satisfy 0 < initial <= max <= 99")


@dataclass(frozen=True)
class Decision:
    switchover: bool
    throttle_pct: int
    expected_downtime_s: float
    reason: str


def expected_downtime(remaining_bytes: int, bandwidth_bps: float) -> float:
    """Seconds to send ``remaining_bytes`` at ``bandwidth_bps`` bytes per second."""
    if remaining_bytes <= 0:
        return 0.0
    if bandwidth_bps <= 0:
        return float("inf")
    return remaining_bytes / bandwidth_bps


def decide(
    policy: ConvergencePolicy,
    passes_done: int,
    remaining_bytes: int,
    bandwidth_bps: float,
    throttle_pct: int,
) -> Decision:
    """The decision after pass ``passes_done`` (1-based)."""
    eta = expected_downtime(remaining_bytes, bandwidth_bps)
    if eta <= policy.downtime_limit_s:
        return Decision(True, throttle_pct, eta, f"expected downtime {eta * 1e3:.1f} ms fits")
    if not policy.auto_converge or passes_done < policy.max_passes:
        return Decision(False, throttle_pct, eta, "iterate")
    if throttle_pct == 0:
        new = policy.throttle_initial
    else:
        new = min(policy.throttle_max, throttle_pct + policy.throttle_increment)
    return Decision(False, new, eta, f"auto-converge throttle {new}%")
