"""What every RTAS call of the guest's mobility code shares: options, report, plumbing.

:class:`MobilityCore` holds the state of one post-migration update (tree, RTAS, clock,
options, report) and the plumbing every call uses: the retried RTAS call, the
bounds-checked work-area reads and the user-space runs.  One module per RTAS call builds
on it (``update_nodes``, ``update_properties``, ``configure_connector``).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from vmferry.errors import HazardError, ModelError
from vmferry.guest.drivers import CacheInfo
from vmferry.hw.devtree.tree import DeviceNode, DeviceTree, HazardRecord, LeakRecord
from vmferry.hw.modes import Modes, Switch
from vmferry.hw.spapr.workarea import (
    WORK_AREA_SIZE,
    NodeOp,
    Rc,
    WorkArea,
    extended_delay_s,
    is_extended_delay,
)
from vmferry.sync import ModelLock, yield_point

HOLDER = "lookup:mobility"


class OutOfBoundsRead(HazardError):
    """Parsing without bounds checks read beyond the 4096-byte work area."""

    hazard = "out-of-bounds-read"


class NullDereference(HazardError):
    """The kernel cc client dereferenced a NULL ``last`` node."""

    hazard = "null-dereference"


class SharedBufferCorruption(HazardError):
    """Another caller's data came back through the global RTAS buffer."""

    hazard = "shared-buffer-corruption"


class RtasDataBuf:
    """The kernel's global ``rtas_data_buf`` and its lock (``mobility_rtas_call``).

    Each call copies the caller's private 4 KiB work area in, calls RTAS on the global
    buffer and copies the result back.  ``locked=False`` reproduces callers that skip
    ``rtas_data_buf_lock``.
    """

    def __init__(self, *, locked: bool = True) -> None:
        self.buf = bytearray(WORK_AREA_SIZE)
        self.lock = ModelLock("rtas_data_buf_lock")
        self.locked = locked

    def call(self, fn: Callable[[bytearray], int], private: bytearray) -> int:
        if self.locked:
            self.lock.acquire()
        try:
            yield_point("rtas_data_buf copy in", self, write=True)
            self.buf[:] = private
            yield_point("rtas call on rtas_data_buf", self, write=True)
            rc = fn(self.buf)
            yield_point("rtas_data_buf copy out", self, write=False)
            private[:] = self.buf
            return rc
        finally:
            if self.locked:
                self.lock.release()


class CcProtocolError(ModelError):
    """configure-connector responses out of order (correct client)."""


class RtasInterface(Protocol):
    """What the guest calls: implemented by :class:`vmferry.hw.spapr.rtas.RtasFirmware`."""

    def update_nodes(self, buf: bytearray, scope: int) -> int: ...
    def update_properties(self, buf: bytearray, scope: int) -> int: ...
    def configure_connector(self, buf: bytearray, extent: bytearray | None = None) -> int: ...
    def activate_firmware(self) -> int: ...


class VirtualClock(Protocol):
    """A clock the model can advance (``vmferry.clock.ManualClock``)."""

    def monotonic(self) -> float: ...
    def advance(self, seconds: float) -> None: ...


class UserSpace(enum.Enum):
    IMMEDIATE = "immediate"  # upstream: user space runs as soon as stop_machine returns
    HELD = "held"  # frozen until the device-tree update is applied


@dataclass(frozen=True)
class MobilityOptions:
    platfac_filter: bool = True
    attach_whole_subtree: bool = True
    cc_client: str = "correct"  # "correct" | "kernel" (newest) | "legacy" (2018-2021)
    skip_drc_on_failed_lookup: bool = True
    retry_busy: bool = True
    bounds_check: bool = True
    partial_name_check: bool = True
    user_space: UserSpace = UserSpace.HELD
    cacheinfo_teardown: bool = True
    legacy_attach_put_parent: bool = False
    missing_token_is_error: bool = False  # pre-v5.11
    merge_readd: bool = False  # target design: delete+add of a phandle becomes updates
    cpus_read_lock: bool = True  # hold cpu hotplug off during the update (2019)
    rtas_call_s: float = 0.0002  # virtual time one RTAS call takes
    max_retries: int = 64


#: switch -> (the option values it sets, what it reproduces, hazard); the scheme every model
#: uses (:mod:`vmferry.hw.modes`)
SWITCHES: dict[str, tuple[dict[str, object], str, str]] = {
    "single_node_attach": ({"attach_whole_subtree": False},
                           "a cc subtree is attached one node at a time", "lost children"),
    "kernel_cc_client": ({"cc_client": "kernel"}, "the newest kernel's cc client",
                         "NULL dereference"),
    "legacy_cc_client": ({"cc_client": "legacy"}, "the 2018-2021 cc client",
                         "NULL dereference"),
    "misaligned_add": ({"skip_drc_on_failed_lookup": False},
                       "the drc word is skipped on a failed ADD lookup", "misparsed page"),
    "busy_abort": ({"retry_busy": False}, "busy / extended delay aborts update-nodes",
                   "update dropped"),
    "no_bounds_check": ({"bounds_check": False}, "work areas are not bounds-checked",
                        "out-of-bounds read"),
    "no_partial_name_check": ({"partial_name_check": False},
                              "split values are not name-checked", "corrupted property"),
    "user_space_immediate": ({"user_space": UserSpace.IMMEDIATE},
                             "user space runs from resume", "stale tree seen"),
    "no_pf_skip": ({"platfac_filter": False},
                   "platform-facilities delete/add not ignored", "use-after-free"),
    "merge_readd": ({"merge_readd": True},
                    "delete+add of a phandle becomes property updates (target design)", ""),
    "legacy_attach_put_parent": ({"legacy_attach_put_parent": True},
                                 "single-node attach puts the parent", "refcount underflow"),
    "missing_token_is_error": ({"missing_token_is_error": True},
                               "a missing update-nodes token is an error (pre-v5.11)", ""),
    "no_cacheinfo_teardown": ({"cacheinfo_teardown": False},
                              "cacheinfo is not torn down around the update", "stale cache"),
    "no_cpus_read_lock": ({"cpus_read_lock": False},
                          "cpu hotplug is not held off during the update", "offline race"),
}

_UPSTREAM = {"single_node_attach", "kernel_cc_client", "misaligned_add", "busy_abort",
             "no_bounds_check", "no_partial_name_check", "user_space_immediate"}
MOBILITY_MODES = Modes(
    "LPM",
    (Switch(name, what, hazard) for name, (_, what, hazard) in SWITCHES.items()),
    {"correct": set(), "upstream": _UPSTREAM, "no_pf_skip": _UPSTREAM | {"no_pf_skip"},
     "misaligned_add": {"misaligned_add"}, "busy_abort": {"busy_abort"},
     "merge_readd": {"merge_readd"}},
    "correct",
)


def options_of(mode: str) -> MobilityOptions:
    """The options of ``preset[+switch...]``; UnknownMode (a ConfigError) if unknown."""
    parsed = MOBILITY_MODES.parse(mode)
    overrides: dict[str, object] = {}
    for name in sorted(parsed.switches):
        overrides.update(SWITCHES[name][0])
    return replace(MobilityOptions(), **overrides)  # type: ignore[arg-type]


#: the presets as options
MODES: dict[str, MobilityOptions] = {name: options_of(name) for name in MOBILITY_MODES.presets}


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # delete-node | add-node | update-property | remove-property | ignored-*
    path: str
    prop: str = ""


@dataclass(frozen=True, slots=True)
class Action:
    op: NodeOp | int
    phandle: int
    drc_index: int | None = None
    offset: int = 0


@dataclass
class MobilityReport:
    rc: int = 0
    actions: list[Action] = field(default_factory=list)
    changes: list[Change] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    #: the typed errors behind ``errors`` (malformed work areas, cc protocol violations)
    rejections: list[ModelError] = field(default_factory=list)
    hazards: list[HazardRecord] = field(default_factory=list)
    leaks: list[LeakRecord] = field(default_factory=list)
    leaked_partials: int = 0
    trace: list[str] = field(default_factory=list)
    resumed_at: float = 0.0
    user_space_at: float = 0.0
    updated_at: float = 0.0
    user_space_runs: int = 0
    stale_user_runs: int = 0

    @property
    def exposure_window_s(self) -> float:
        """Time user space ran against the stale (pre-update) tree."""
        return max(0.0, self.updated_at - self.user_space_at)

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.hazards and not self.errors and not self.leaks


@dataclass
class PendingValue:
    name: str
    value: bytearray


class MobilityCore:
    """The guest's mobility code bound to one tree, one RTAS and one clock."""

    def __init__(self, tree: DeviceTree, rtas: RtasInterface, clock: VirtualClock,
                 options: MobilityOptions | None = None, *,
                 tokens: frozenset[str] | None = None,
                 cacheinfo: CacheInfo | None = None,
                 user_space: Callable[[], None] | None = None,
                 data_buf: RtasDataBuf | None = None) -> None:
        self.tree = tree
        self.rtas = rtas
        self.clock = clock
        self.opts = options or MobilityOptions()
        self.tokens = tokens if tokens is not None else frozenset(
            {"ibm,update-nodes", "ibm,update-properties", "ibm,configure-connector"})
        self.cacheinfo = cacheinfo
        self.user_space = user_space
        self.data_buf = data_buf
        self.cpu_hotplug = ModelLock("cpu_hotplug")
        self.updating = False  # inside the device-tree update (for cpu_offline's check)
        self.report = MobilityReport()
        # merge_readd: deletes deferred until the sequence ends (each holds a reference)
        self._deferred: dict[int, DeviceNode] = {}

    def _run_user_space(self, *, stale: bool) -> None:
        if self.user_space is None:
            return
        if stale and self.opts.user_space is UserSpace.HELD:
            return
        self.report.user_space_runs += 1
        self.report.stale_user_runs += stale
        try:
            self.user_space()
        except HazardError as exc:
            self.report.hazards.append(HazardRecord(exc.hazard, "", "user space", str(exc)))

    def _call(self, fn: Callable[[], int]) -> int:
        """One RTAS call, retried on busy/extended delay when ``retry_busy``."""
        for _ in range(self.opts.max_retries):
            yield_point("rtas call", "rtas", write=True)
            self.clock.advance(self.opts.rtas_call_s)
            rc = fn()
            if rc == Rc.BUSY and self.opts.retry_busy:
                continue
            if is_extended_delay(rc) and self.opts.retry_busy:
                self.clock.advance(extended_delay_s(rc))
                continue
            return rc
        return Rc.BUSY

    def _u32(self, wa: WorkArea, off: int) -> int:
        if not self.opts.bounds_check and not 0 <= off <= WORK_AREA_SIZE - 4:
            raise OutOfBoundsRead(f"update-nodes parser read beyond the work area at {off:#x}")
        return wa.u32(off)
