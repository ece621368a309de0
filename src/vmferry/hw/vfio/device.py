"""A VFIO device with migration v2: the ``VFIO_DEVICE_FEATURE`` multiplexer and the FSM.

Theory of operation
-------------------
``VfioMigrationDevice`` is the VFIO core plus the driver-side set-state loop.  User space
reaches it two ways:

* the binary uAPI, ``ioctl(cmd, arg)`` over a byte buffer standing for user memory (a
  read-only buffer faults on copy-out, a short one on copy-in), with the kernel's
  validation order (docs/models/vfio-migration-v2.md §3) and an :class:`FdTable` for ``data_fd``;
* a Pythonic face: ``set_state(new) -> DataStream | None``, ``get_state()``,
  ``data_size()``, ``migration_flags``, ``reset()``.

A SET runs under the per-device ``state_mutex``: it asks :func:`fsm.next_state` for one
hop at a time, has the driver perform that arc and commits the state only after the arc
succeeded.  A file may come only from the final hop.  A failing arc leaves the device at
the last hop that succeeded (the caller learns where with GET); a driver that cannot
recover sends the device to ERROR, left only by ``reset()``.  ``reset()`` follows mlx5's
deferred-reset pattern: it never blocks on ``state_mutex``; if someone holds it, the
holder performs the reset when it unlocks.

Faults (named, off by default) reproduce the hazards of docs/models/vfio-migration-v2.md §11.3:
``commit_before_step``, ``leak_on_copyout_fault``, ``precopy_info_unlocked``,
``no_state_mutex``, ``echo_precopy_flags``, ``fd_outlives_close``,
``reset_takes_state_mutex``; the FSM mode ``error_sentinel_loop`` reproduces the pre-2026
endless loop (reported as NonTermination while ``state_mutex`` stays held, as the spinning
kernel thread would hold it); driver faults are listed in ``drivers.base``.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterable

from vmferry.errors import (
    ConfigError,
    InvariantViolation,
    NonTermination,
    RefcountLeak,
    UseAfterFree,
)
from vmferry.hw.vfio.drivers.base import DRIVER_FAULTS, Activity, DeviceCapability, VariantDriver
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.fsm import ARCS, FsmMode, next_state
from vmferry.hw.vfio.states import (
    FEATURE_FLAG_BITS,
    FEATURE_HEADER,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    MIG_FEATURE_MINSZ,
    PRE_COPY_STATES,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_MASK,
    VFIO_DEVICE_FEATURE_PROBE,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_RESET,
    VFIO_PRECOPY_INFO_REINIT,
    DeviceState,
    Feature,
    MigrationFlags,
)
from vmferry.hw.vfio.stream import (
    Buffer,
    DataStream,
    FdTable,
    PrecopyInfo,
    StreamKind,
    copy_in,
    copy_out,
)
from vmferry.sync import ModelLock, current_thread, yield_point

S = DeviceState
GET, SET, PROBE = VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_PROBE

CORE_FAULTS = (
    "commit_before_step",
    "leak_on_copyout_fault",
    "precopy_info_unlocked",
    "no_state_mutex",
    "echo_precopy_flags",
    "fd_outlives_close",
    "reset_takes_state_mutex",
)
ALL_FAULTS = CORE_FAULTS + DRIVER_FAULTS

#: feature index -> (supported ops, minimum payload)
_MIG_FEATURES: dict[int, tuple[int, int]] = {
    Feature.MIGRATION: (GET, MIG_FEATURE_MINSZ),
    Feature.MIG_DEVICE_STATE: (GET | SET, MIG_FEATURE_MINSZ),
    Feature.MIG_DATA_SIZE: (GET, MIG_FEATURE_MINSZ),
    Feature.MIG_PRECOPY_INFOV2: (SET, 0),
}


def check_feature(flags: int, payload_sz: int, ops: int, minsz: int) -> bool:
    """``vfio_check_feature``: True means "PROBE succeeded, do nothing"."""
    if flags & (GET | SET) & ~ops:
        raise VfioError(errno.EINVAL, f"feature {flags & 0xFFFF} does not support {flags:#x}")
    if flags & PROBE:
        return True
    if not flags & (GET | SET):
        raise VfioError(errno.EINVAL, "neither GET nor SET requested")
    if payload_sz < minsz:
        raise VfioError(errno.EINVAL, f"payload of {payload_sz} bytes < {minsz}")
    return False


class VfioMigrationDevice:
    """One opened VFIO device; ``driver=None`` models a device without migration ops."""

    def __init__(
        self,
        driver: VariantDriver | None,
        *,
        name: str = "vfio0",
        fds: FdTable | None = None,
        faults: Iterable[str] = (),
        fsm_mode: FsmMode = "fixed",
        precopy_v2_supported: bool = True,
    ) -> None:
        bad = set(faults) - set(ALL_FAULTS)
        if bad:
            raise ConfigError(f"unknown VFIO fault(s) {sorted(bad)}; known: {ALL_FAULTS}")
        self.name = name
        self.driver = driver
        self.fds = fds if fds is not None else FdTable()
        self.faults = frozenset(faults)
        self.fsm_mode: FsmMode = fsm_mode
        self.precopy_v2_supported = precopy_v2_supported
        self.precopy_v2 = False  # opted in through feature 12
        self.state_mutex = ModelLock(f"{name}.state_mutex")
        #: invariant: only ever a state reached by a completed hop, ERROR, or RUNNING by reset
        self._state = S.RUNNING
        self._deferred_reset = False
        self.is_open = True
        #: every session file ever created (leak detector)
        self.files: list[DataStream] = []
        #: injected arc failures: (cur, nxt) -> (errno, unrecoverable)
        self.fail_arcs: dict[tuple[DeviceState, DeviceState], tuple[int, bool]] = {}
        if driver is not None:
            driver.faults = self.faults & set(DRIVER_FAULTS)

    # --- Pythonic face ---------------------------------------------------------------------

    @property
    def migration_flags(self) -> MigrationFlags:
        return self._mig_driver().flags

    def get_state(self) -> DeviceState:
        self._mig_driver()
        with self.state_mutex:
            yield_point("get state", self, write=False)
            return self._state

    @property
    def state(self) -> DeviceState:
        """The state without taking the lock (for invariants and reports)."""
        return self._state

    def set_state(self, new: int) -> DataStream | None:
        """Walk to ``new``; returns the new session's stream (user reference) or None.

        Raises VfioError (``.state`` = where the device is now) and, in the
        ``error_sentinel_loop`` mode, NonTermination.
        """
        self._mig_driver()
        try:
            return self._set_state(new)
        except VfioError as exc:
            exc.state = self._state
            raise

    def data_size(self) -> int:
        return self._mig_driver().data_size()

    def capability(self) -> DeviceCapability:
        return self._mig_driver().capability()

    def state_digest(self) -> str:
        return self._mig_driver().state_digest()

    def run(self, ticks: int) -> int:
        """Let the hardware work ``ticks`` steps (no-op unless RUNNING/PRE_COPY)."""
        return self._mig_driver().run(ticks)

    def _mig_driver(self) -> VariantDriver:
        if self.driver is None:
            raise VfioError(errno.ENOTTY, f"{self.name} has no migration support")
        if not self.is_open:
            raise VfioError(errno.ENODEV, f"{self.name} is closed")
        return self.driver

    # --- the set-state loop ----------------------------------------------------------------

    def _lock_state(self) -> None:
        if "no_state_mutex" not in self.faults:
            self.state_mutex.acquire()

    def _unlock_state(self) -> None:
        """mlx5's state_mutex_unlock: run a deferred reset before releasing."""
        while self._deferred_reset:
            self._deferred_reset = False
            self._do_reset()
        if "no_state_mutex" not in self.faults:
            self.state_mutex.release()

    def _set_state(self, new: int) -> DataStream | None:
        driver = self._mig_driver()
        self._lock_state()
        try:
            result = self._walk(driver, new)
        except NonTermination:
            raise  # the spinning thread never unlocks: state_mutex stays held
        except BaseException:
            self._unlock_state()
            raise
        self._unlock_state()
        return result

    def _walk(self, driver: VariantDriver, new: int) -> DataStream | None:
        if self._state == S.ERROR:
            raise VfioError(driver.error_state_errno, f"{self.name} is in ERROR; reset it")
        result: DataStream | None = None
        while self._state != new:
            cur = self._state
            yield_point("set state: next hop", self, write=False)
            nxt = next_state(driver.flags, cur, new, mode=self.fsm_mode)
            if "commit_before_step" in self.faults:
                self._state = nxt
            result = self._arc(driver, cur, nxt)
            self._state = nxt
            yield_point("set state: hop committed", self, write=True)
            if result is not None and nxt != new:
                result.put()
                raise VfioError(errno.EINVAL, f"intermediate hop {nxt.name} opened a session")
        return result

    def _arc(self, driver: VariantDriver, cur: DeviceState, nxt: DeviceState) -> DataStream | None:
        effect = ARCS.get((cur, nxt))
        if effect is None:
            raise VfioError(errno.EINVAL, f"{driver.name} has no arc {cur.name} -> {nxt.name}")
        injected = self.fail_arcs.get((cur, nxt))
        if injected is not None:
            err, unrecoverable = injected
            if unrecoverable:
                self._enter_error()
            raise VfioError(err, f"arc {cur.name} -> {nxt.name} failed (injected)")
        stream = driver.step(self, cur, nxt, effect)
        if stream is not None:
            self.files.append(stream)
        return stream

    def _enter_error(self) -> None:
        """The driver cannot restore any valid state: ERROR until reset."""
        driver = self._mig_driver()
        driver.drop_sessions()
        driver.activity = Activity.STOPPED
        self._state = S.ERROR

    def fail_hardware(self) -> None:
        """A firmware/PF-initiated recovery lost the device state (pds): ERROR."""
        self._lock_state()
        try:
            self._enter_error()
        finally:
            self._unlock_state()

    # --- reset and lifetime ----------------------------------------------------------------

    def reset(self) -> None:
        """``VFIO_DEVICE_RESET``: RUNNING, every session file disabled; never blocks."""
        self._mig_driver()
        self._deferred_reset = True
        if "reset_takes_state_mutex" in self.faults:
            self.state_mutex.acquire()  # blocks on the holder: the ABBA hazard
        elif not _trylock(self.state_mutex):
            return  # the holder runs the reset when it unlocks
        self._unlock_state()

    def _do_reset(self) -> None:
        driver = self._mig_driver()
        driver.drop_sessions()
        driver.hw_reset()
        self._state = S.RUNNING
        driver.activity = Activity.ACTIVE

    def close_device(self) -> None:
        """Release the device: every session file is disabled and drops the device."""
        driver = self._mig_driver()
        self._lock_state()
        try:
            if "fd_outlives_close" in self.faults:
                driver.saving = driver.resuming = None
            else:
                driver.drop_sessions()
        finally:
            self._unlock_state()
        self.is_open = False

    def open_device(self) -> None:
        """Open (again) for a new owner: the migration state starts at RUNNING."""
        if self.driver is None:
            raise VfioError(errno.ENOTTY, f"{self.name} has no migration support")
        if self.is_open:
            raise VfioError(errno.EBUSY, f"{self.name} is already open")
        self.is_open = True
        self._state = S.RUNNING
        self.driver.hw_reset()
        self.driver.activity = Activity.ACTIVE

    # --- streams call back here ----------------------------------------------------------

    def stream_write(self, stream: DataStream, data: memoryview) -> int:
        driver = self._mig_driver()
        self._lock_state()
        try:
            with stream.lock:
                yield_point("stream write", stream, write=True)
                if stream.disabled or stream.errored:
                    raise VfioError(errno.ENODEV, f"{stream.name} is disabled or in error")
                if stream.kind is not StreamKind.RESUMING:
                    raise VfioError(errno.EBADF, f"{stream.name} is a saving stream")
                taken = driver.resume_write(stream, data)
                stream.pos += taken
                return taken
        finally:
            self._unlock_state()

    def stream_precopy_info(self, stream: DataStream, user_flags: int) -> PrecopyInfo:
        driver = self._mig_driver()
        if "precopy_info_unlocked" in self.faults:
            return self._precopy_info_unlocked(driver, stream, user_flags)
        self._lock_state()
        try:
            if self._state not in PRE_COPY_STATES:
                raise VfioError(errno.EINVAL, f"precopy info in {self._state.name}")
            yield_point("precopy info: state checked", self, write=False)
            with stream.lock:
                if stream.disabled:
                    raise VfioError(errno.ENODEV, f"{stream.name} was disabled")
                info = driver.precopy_query(stream, self._state)
                return self._precopy_flags(stream, info, user_flags)
        finally:
            self._unlock_state()

    def _precopy_info_unlocked(
        self, driver: VariantDriver, stream: DataStream, user_flags: int
    ) -> PrecopyInfo:
        """Faulty: check the state without state_mutex, then compute (TOCTOU)."""
        if self._state not in PRE_COPY_STATES:
            raise VfioError(errno.EINVAL, f"precopy info in {self._state.name}")
        state = self._state
        yield_point("precopy info: state checked", self, write=False)
        if stream.disabled or self._state not in PRE_COPY_STATES:
            raise UseAfterFree(f"precopy info computed on {stream.name} after the session "
                               f"left PRE_COPY (now {self._state.name})")  # fmt: skip
        return self._precopy_flags(stream, driver.precopy_query(stream, state), user_flags)

    def _precopy_flags(self, stream: DataStream, info: PrecopyInfo, user: int) -> PrecopyInfo:
        flags = 0
        if self.precopy_v2 and stream.reinit_pending:
            flags |= VFIO_PRECOPY_INFO_REINIT
            stream.reinit_pending = False
        if "echo_precopy_flags" in self.faults and not self.precopy_v2:
            flags = user
        return PrecopyInfo(info.initial_bytes, info.dirty_bytes, flags)

    # --- the binary uAPI ---------------------------------------------------------------------

    def ioctl(self, cmd: int, arg: Buffer = b"") -> int:
        """The device fd's ioctls: VFIO_DEVICE_FEATURE and VFIO_DEVICE_RESET."""
        if cmd == VFIO_DEVICE_FEATURE:
            return self._device_feature(arg)
        if cmd == VFIO_DEVICE_RESET:
            self.reset()
            return 0
        raise VfioError(errno.ENOTTY, f"ioctl {cmd:#x} unknown on a VFIO device")

    def _device_feature(self, arg: Buffer) -> int:
        argsz, flags = FEATURE_HEADER.unpack(copy_in(arg, 0, FEATURE_HEADER.size))
        if argsz < FEATURE_HEADER.size:
            raise VfioError(errno.EINVAL, f"argsz {argsz} < {FEATURE_HEADER.size}")
        if flags & ~FEATURE_FLAG_BITS:
            raise VfioError(errno.EINVAL, f"unknown feature flag bits {flags:#x}")
        if flags & GET and flags & SET and not flags & PROBE:
            raise VfioError(errno.EINVAL, "GET and SET together need PROBE")
        index = flags & VFIO_DEVICE_FEATURE_MASK
        if index not in _MIG_FEATURES:
            # vfio_ioctl_device_feature hands an index it does not own to the driver's
            # device_feature hook; every modelled variant driver uses
            # vfio_pci_core_ioctl_feature, whose default case is -ENOTTY.
            raise VfioError(errno.ENOTTY, f"feature {index:#x} unknown to vfio-pci-core")
        if self.driver is None or (index == Feature.MIG_PRECOPY_INFOV2
                                   and not self.precopy_v2_supported):  # fmt: skip
            raise VfioError(errno.ENOTTY, f"{self.name}: feature {index} not supported")
        ops, minsz = _MIG_FEATURES[index]
        if check_feature(flags, argsz - FEATURE_HEADER.size, ops, minsz):
            return 0
        return self._feature_op(index, flags, arg)

    def _feature_op(self, index: int, flags: int, arg: Buffer) -> int:
        hdr = FEATURE_HEADER.size
        if index == Feature.MIGRATION:
            copy_out(arg, hdr, FEATURE_MIGRATION.pack(int(self.migration_flags)))
        elif index == Feature.MIG_DATA_SIZE:
            copy_out(arg, hdr, FEATURE_MIG_DATA_SIZE.pack(self.data_size()))
        elif index == Feature.MIG_PRECOPY_INFOV2:
            self.precopy_v2 = True
        elif flags & GET:
            copy_out(arg, hdr, FEATURE_MIG_STATE.pack(int(self.get_state()), -1))
        else:
            return self._feature_set_state(arg)
        return 0

    def _feature_set_state(self, arg: Buffer) -> int:
        hdr = FEATURE_HEADER.size
        requested, _ = FEATURE_MIG_STATE.unpack(copy_in(arg, hdr, FEATURE_MIG_STATE.size))
        try:
            stream = self._set_state(requested)
        except VfioError:
            _try_copy_out(arg, hdr, FEATURE_MIG_STATE.pack(requested, -1))
            raise
        if stream is None:
            copy_out(arg, hdr, FEATURE_MIG_STATE.pack(requested, -1))
            return 0
        return self._install_fd(arg, requested, stream)

    def _install_fd(self, arg: Buffer, requested: int, stream: DataStream) -> int:
        leak = "leak_on_copyout_fault" in self.faults
        try:
            fd = self.fds.reserve()
        except VfioError:
            if not leak:
                stream.put()
            raise
        try:
            copy_out(arg, FEATURE_HEADER.size, FEATURE_MIG_STATE.pack(requested, fd))
        except VfioError:
            if not leak:
                self.fds.put_unused(fd)
                stream.put()
            raise
        self.fds.install(fd, stream)
        return 0

    # --- invariants ---------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Raise a HazardError if the model broke an invariant of docs/models/vfio-migration-v2.md
        §11.2."""
        driver = self.driver
        if driver is None:
            return
        live = {id(s) for s in (driver.saving, driver.resuming) if s is not None}
        for stream in self.files:
            if not stream.disabled and id(stream) not in live:
                raise InvariantViolation(f"{stream.name} is orphaned by its session but live")
            if stream.disabled and stream.owner is not None:
                raise InvariantViolation(f"disabled {stream.name} still points at the device")
        if driver.saving is not None and driver.resuming is not None:
            raise InvariantViolation("a saving and a resuming session are live together")
        if self.fds.reserved:
            raise RefcountLeak(f"fd numbers reserved but never installed: {self.fds.reserved}")
        self._check_session_matches_state(driver)

    def _check_session_matches_state(self, driver: VariantDriver) -> None:
        saving_ok = self._state in (*PRE_COPY_STATES, S.STOP_COPY)
        if driver.saving is not None and not saving_ok:
            raise InvariantViolation(f"saving session live in {self._state.name}")
        if driver.resuming is not None and self._state != S.RESUMING:
            raise InvariantViolation(f"resuming session live in {self._state.name}")

    def leaked_files(self) -> list[DataStream]:
        """Files with references left (call after the user closed its fds)."""
        return [s for s in self.files if s.refcount != 0]

    def __repr__(self) -> str:
        driver = self.driver.name if self.driver else "none"
        return f"VfioMigrationDevice({self.name!r}, driver={driver}, state={self._state.name})"


def _trylock(lock: ModelLock) -> bool:
    """mutex_trylock: take ``lock`` if free, never wait."""
    yield_point(f"trylock {lock.name}", lock, write=True)
    if lock.owner is not None:
        return False
    lock.owner = current_thread()
    return True


def _try_copy_out(arg: Buffer, offset: int, data: bytes) -> None:
    with contextlib.suppress(VfioError):
        copy_out(arg, offset, data)
