"""The VMM side of VFIO migration, as QEMU drives it (``hw/vfio/migration.c``).

:class:`VmmDevice` is QEMU's per-device ``VFIOMigration``: a cached ``device_state``
(starting RUNNING), at most one ``data_fd``, and every request made through the binary
``VFIO_DEVICE_FEATURE`` uAPI.  ``set_state(new, recover)`` follows QEMU: on failure it
tries ``recover`` (or resets when ``recover`` is ERROR or itself fails); a new data fd
arriving while one is held means an asynchronous reset ended the session: the new fd is
closed and the call fails EBADF ("data_fd out of sync").

Phases (the migration engine calls these in this order; see the module functions
:func:`switchover` and :func:`resume_all` for the multi-device ordering):

* source:  ``save_setup`` -> ``save_iterate``* (pre-copy, interleaved with RAM passes;
  ``pending`` feeds the downtime estimate) -> ``prepare_stop`` (every device) ->
  ``stop`` (every device) -> ``complete_precopy`` (read to EOF) -> ``save_cleanup``;
  on failure ``migration_failed`` (back to RUNNING).
* destination: ``load_setup`` -> ``load_data``* (in stream order) -> ``load_cleanup``
  -> ``start_prepare`` (every device; RESUMING -> STOP validates here) -> ``start``
  (every device); on failure ``load_failed`` (reset).
"""

from __future__ import annotations

import errno
from collections.abc import Iterator, Mapping, Sequence

from vmferry.errors import MigrationRefused
from vmferry.hw.vfio.device import VfioMigrationDevice
from vmferry.hw.vfio.drivers.base import DeviceCapability
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.states import (
    FEATURE_HEADER,
    FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_STATE,
    FEATURE_MIGRATION,
    PRE_COPY_STATES,
    PRECOPY_INFO,
    VFIO_DEVICE_FEATURE,
    VFIO_DEVICE_FEATURE_GET,
    VFIO_DEVICE_FEATURE_SET,
    VFIO_DEVICE_RESET,
    VFIO_MIG_GET_PRECOPY_INFO,
    DeviceState,
    Feature,
    MigrationFlags,
)
from vmferry.hw.vfio.stream import DataStream, FdTable

S = DeviceState
#: QEMU's transfer buffer cap
MAX_BUFFER = 1 << 20


def _feature(flags: int, payload: bytes = b"") -> bytearray:
    return bytearray(FEATURE_HEADER.pack(FEATURE_HEADER.size + len(payload), flags) + payload)


class VmmDevice:
    """One VFIO device as the VMM sees it."""

    def __init__(self, device: VfioMigrationDevice, fds: FdTable | None = None) -> None:
        self.device = device
        self.fds = fds if fds is not None else device.fds
        buf = _feature(VFIO_DEVICE_FEATURE_GET | Feature.MIGRATION, bytes(8))
        try:
            device.ioctl(VFIO_DEVICE_FEATURE, buf)
        except VfioError as exc:
            raise MigrationRefused(f"{device.name}: no VFIO migration support ({exc})") from exc
        (flags,) = FEATURE_MIGRATION.unpack_from(buf, FEATURE_HEADER.size)
        self.flags = MigrationFlags(flags)
        if not self.flags & MigrationFlags.STOP_COPY:
            raise MigrationRefused(f"{device.name}: migration lacks STOP_COPY")
        self.state = S.RUNNING  # QEMU's cached copy
        self.data_fd = -1
        self.initial_bytes = self.dirty_bytes = 0
        self.buffer_size = MAX_BUFFER
        #: every state the VMM successfully requested, in order
        self.requested: list[DeviceState] = []

    @property
    def has_p2p(self) -> bool:
        return bool(self.flags & MigrationFlags.P2P)

    @property
    def has_precopy(self) -> bool:
        return bool(self.flags & MigrationFlags.PRE_COPY)

    # --- uAPI calls ----------------------------------------------------------------------

    def _set(self, new: DeviceState) -> int:
        buf = _feature(VFIO_DEVICE_FEATURE_SET | Feature.MIG_DEVICE_STATE,
                       FEATURE_MIG_STATE.pack(int(new), -1))  # fmt: skip
        self.device.ioctl(VFIO_DEVICE_FEATURE, buf)
        _, fd = FEATURE_MIG_STATE.unpack_from(buf, FEATURE_HEADER.size)
        return int(fd)

    def data_size(self) -> int:
        buf = _feature(VFIO_DEVICE_FEATURE_GET | Feature.MIG_DATA_SIZE, bytes(8))
        self.device.ioctl(VFIO_DEVICE_FEATURE, buf)
        return int(FEATURE_MIG_DATA_SIZE.unpack_from(buf, FEATURE_HEADER.size)[0])

    def reset(self) -> None:
        self.device.ioctl(VFIO_DEVICE_RESET)
        self.state = S.RUNNING
        self._close_fd()

    def set_state(self, new: DeviceState, recover: DeviceState = S.ERROR) -> None:
        if new == self.state:
            return
        try:
            fd = self._set(new)
        except VfioError:
            self._recover(recover)
            raise
        self.state = new
        self.requested.append(new)
        if fd >= 0:
            if self.data_fd >= 0:
                self.fds.close(fd)
                raise VfioError(errno.EBADF, f"{self.device.name}: data_fd out of sync")
            self.data_fd = fd

    def _recover(self, recover: DeviceState) -> None:
        if recover != S.ERROR:
            try:
                self._set(recover)
                self.state = recover
                return
            except VfioError:
                pass
        self.reset()

    def _stream(self) -> DataStream:
        return self.fds.get(self.data_fd)

    def saved_bytes(self) -> int:
        """The bytes the device has queued in its migration file so far (0: no file): it
        grows when the device saves its state -- entering PRE_COPY, a precopy-info query
        that starts an incremental save, the stop."""
        return self._stream().appended if self.data_fd >= 0 else 0

    def _close_fd(self) -> None:
        if self.data_fd >= 0:
            self.fds.close(self.data_fd)
            self.data_fd = -1

    def precopy_info(self) -> tuple[int, int]:
        buf = bytearray(PRECOPY_INFO.pack(PRECOPY_INFO.size, 0, 0, 0))
        self._stream().ioctl(VFIO_MIG_GET_PRECOPY_INFO, buf)
        _, _, initial, dirty = PRECOPY_INFO.unpack(buf)
        self.initial_bytes, self.dirty_bytes = initial, dirty
        return initial, dirty

    # --- source ----------------------------------------------------------------------------

    def save_setup(self) -> None:
        self.buffer_size = min(MAX_BUFFER, max(1, self.data_size()))
        if self.has_precopy and self.state == S.RUNNING:
            self.set_state(S.PRE_COPY, recover=S.RUNNING)
            self.precopy_info()

    def save_iterate(self) -> bytes:
        """One pre-copy chunk (b"" when the device has nothing right now)."""
        if self.state not in PRE_COPY_STATES:
            return b""
        if self.initial_bytes == 0 and self.dirty_bytes == 0:
            self.precopy_info()
        try:
            chunk = self._stream().read(self.buffer_size)
        except VfioError as exc:
            if exc.errno != errno.ENOMSG:
                raise
            chunk = b""
        self.precopy_info()
        return chunk

    def pending(self) -> int:
        """Pre-copy bytes the device still reports (the downtime estimate's share)."""
        if self.state in PRE_COPY_STATES:
            return self.initial_bytes + self.dirty_bytes
        return 0

    def pending_exact(self) -> int:
        extra = sum(self.precopy_info()) if self.state in PRE_COPY_STATES else 0
        return self.data_size() + extra

    def prepare_stop(self) -> None:
        """VM-stop prepare hook: quiesce P2P before any device stops."""
        if not self.has_p2p:
            return
        self.set_state(S.PRE_COPY_P2P if self.state in PRE_COPY_STATES else S.RUNNING_P2P,
                       recover=S.ERROR)  # fmt: skip

    def stop(self) -> None:
        """VM-stop main hook."""
        if self.state in PRE_COPY_STATES:
            self.set_state(S.STOP_COPY, recover=S.ERROR)
        else:
            self.set_state(S.STOP, recover=S.ERROR)

    def complete_precopy(self) -> Iterator[memoryview]:
        """STOP_COPY: the remaining device state, chunk by chunk (at most
        ``buffer_size`` bytes each), to EOF.

        The device is stopped, so its data does not change until the session ends: the
        chunks are views of it (:meth:`DataStream.read_view`), which the caller may keep
        until they have been sent -- QEMU reads into a transfer buffer it reuses, so a
        read costs it no new memory either.
        """
        self.set_state(S.STOP_COPY, recover=S.STOP)
        stream = self._stream()
        while chunk := stream.read_view(self.buffer_size):
            yield chunk

    def save_cleanup(self) -> None:
        if self.state == S.STOP_COPY:
            self.set_state(S.STOP, recover=S.ERROR)
        self._close_fd()

    def migration_failed(self) -> None:
        self._close_fd()
        self.set_state(S.RUNNING, recover=S.ERROR)

    # --- destination -------------------------------------------------------------------------

    def load_setup(self) -> None:
        self.set_state(S.RESUMING, recover=self.state)

    def load_data(self, chunk: bytes | bytearray | memoryview) -> None:
        self._stream().write_all(chunk)

    def load_cleanup(self) -> None:
        self._close_fd()

    def start_prepare(self) -> None:
        if self.has_p2p:
            self.set_state(S.RUNNING_P2P, recover=S.ERROR)

    def start(self) -> None:
        self.set_state(S.RUNNING, recover=S.ERROR)

    def load_failed(self) -> None:
        self.reset()


def check_migratable(vmms: Sequence[VmmDevice]) -> None:
    """QEMU's blocker: more than one VFIO device requires P2P on all of them."""
    if len(vmms) > 1:
        lacking = [v.device.name for v in vmms if not v.has_p2p]
        if lacking:
            raise MigrationRefused(f"{len(vmms)} VFIO devices but {lacking} lack P2P: "
                                   "multi-device migration needs P2P on every device")  # fmt: skip


def switchover(vmms: Sequence[VmmDevice]) -> None:
    """Source VM stop: every prepare hook (P2P) before any main hook (STOP/STOP_COPY)."""
    for vmm in vmms:
        vmm.prepare_stop()
    for vmm in reversed(vmms):
        vmm.stop()


def resume_all(vmms: Sequence[VmmDevice]) -> None:
    """Destination VM start: every device to RUNNING_P2P, then every one to RUNNING."""
    for vmm in vmms:
        vmm.load_cleanup()
    for vmm in vmms:
        vmm.start_prepare()
    for vmm in vmms:
        vmm.start()


class MultifdLoader:
    """Destination of QEMU's multifd device-state packets: write strictly in idx order."""

    INVALID_IDX = 0xFFFFFFFF

    def __init__(self, stream: DataStream) -> None:
        self.stream = stream
        self.next_idx = 0
        self.queued: dict[int, bytes] = {}
        self.config: bytes | None = None
        self.written_order: list[int] = []

    def packet(self, idx: int, data: bytes, *, config: bool = False) -> None:
        if idx == self.INVALID_IDX or idx < self.next_idx or idx in self.queued:
            raise VfioError(errno.EINVAL, f"multifd device-state packet idx {idx} invalid "
                            "or duplicate")  # fmt: skip
        if config:
            self.config = data
            self.queued[idx] = b""
        else:
            self.queued[idx] = data
        while self.next_idx in self.queued:
            payload = self.queued.pop(self.next_idx)
            if self.config is None or payload:
                self.stream.write_all(payload)
            self.written_order.append(self.next_idx)
            self.next_idx += 1

    @property
    def complete(self) -> bool:
        return self.config is not None and not self.queued


def preflight(
    source: Mapping[str, DeviceCapability], destination: Mapping[str, DeviceCapability]
) -> None:
    """Refuse up front (MigrationRefused, naming the device) when the destination lacks a
    device of the source or cannot host its type."""
    for name, cap in source.items():
        if not cap.flags & MigrationFlags.STOP_COPY:
            raise MigrationRefused(f"device {name}: no VFIO migration support")
        host = destination.get(name)
        if host is None:
            raise MigrationRefused(f"device {name}: the destination has no such device")
        reason = host.refusal(cap)
        if reason is not None:
            raise MigrationRefused(f"device {name}: destination cannot host it: {reason}")
