"""The VFIO model's correct and faulty modes (the scheme of :mod:`vmferry.hw.modes`).

Switches are the device faults (:data:`~vmferry.hw.vfio.device.CORE_FAULTS`), the variant
driver faults (:data:`~vmferry.hw.vfio.drivers.base.DRIVER_FAULTS`) and the FSM's
``error_sentinel_loop``; ``correct`` has none, and each switch is also a preset of its own,
so ``stale_fd`` and ``correct+stale_fd+no_state_mutex`` are both modes.
"""

from __future__ import annotations

from vmferry.hw.modes import Mode, Modes, Switch
from vmferry.hw.vfio.device import ALL_FAULTS
from vmferry.hw.vfio.fsm import FsmMode

#: switch -> (faulty behaviour, hazard) of docs/models/vfio-migration-v2.md §11.3
VFIO_SWITCHES: dict[str, tuple[str, str]] = {
    "commit_before_step": ("the state is committed before the arc ran", "state lies"),
    "leak_on_copyout_fault": ("a copy-out fault leaks the new file", "fd leak"),
    "precopy_info_unlocked": ("PRECOPY_INFO checks the state without state_mutex",
                              "stale answer"),
    "no_state_mutex": ("state changes do not take state_mutex", "torn transition"),
    "echo_precopy_flags": ("precopy flags are echoed unchecked", "bad flags accepted"),
    "fd_outlives_close": ("a data file keeps working after the device closed",
                          "use after close"),
    "reset_takes_state_mutex": ("reset blocks on state_mutex", "deadlock"),
    "stale_fd": ("a session ends without disabling its file", "use after orphan"),
    "resume_accept_any": ("RESUMING -> STOP loads whatever was written", "unvalidated load"),
    "corrupt_save": ("the final saved data has one byte flipped", "bad image"),
    "error_sentinel_loop": ("the FSM skip loop spins on the ERROR sentinel (pre-2026)",
                            "endless loop"),
}
assert set(VFIO_SWITCHES) == {*ALL_FAULTS, "error_sentinel_loop"}

VFIO_MODES = Modes("VFIO", (Switch(n, b, h) for n, (b, h) in VFIO_SWITCHES.items()),
                   {"correct": (), **{n: {n} for n in VFIO_SWITCHES}}, "correct")


def device_options(mode: str | Mode) -> tuple[frozenset[str], FsmMode]:
    """The device faults and FSM mode of ``preset[+switch...]`` (UnknownMode if unknown)."""
    parsed = VFIO_MODES.parse(mode) if isinstance(mode, str) else mode
    fsm: FsmMode = "error_sentinel_loop" if "error_sentinel_loop" in parsed else "fixed"
    return parsed.switches - {"error_sentinel_loop"}, fsm
