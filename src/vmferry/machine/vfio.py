"""A VM's VFIO devices in live migration: one handler drives them all, as QEMU does.

Theory of operation
-------------------
The ``devices`` key of a VM definition is a list of device entries (see
:mod:`vmferry.hw.vfio.factory`; an entry may add ``"migration": false`` for a device
whose driver has no migration support).  :func:`setup_devices` builds them on guest RAM
and attaches one :class:`VfioHandler` owning every device of the VM.  While the vCPUs
run, :meth:`VfioHandler.advance` lets the hardware work (``TICKS_PER_SECOND`` work items
a second per device): devices in RUNNING/PRE_COPY change their internal state and DMA
into guest RAM, which marks the dirty log; in the P2P and stopped states they do nothing.

The handler is QEMU's VFIO migration code for all devices at once
(:mod:`vmferry.hw.vfio.vmm` is the per-device part):

source                                      device states
------                                      -------------
preflight: every device migratable,         -
  more than one device -> all have P2P,
  the destination hosts each type; each
  device writes the newest state version
  the destination announced for its driver
save_setup                                  RUNNING -> PRE_COPY (where supported)
save_switchover_ack: devices with pre-copy  -
  will mark the end of their initial data
save_iterate: read pre-copy data;           PRE_COPY
  INIT_SENT once initial_bytes reached 0
pending_bytes: pre-copy + STOP_COPY sizes   -
stop_cost_s: the last save pre-copy timed  -
  (entering PRE_COPY, or a read whose
  query started one), per device
quiesce (vCPUs paused, before the final     every device -> RUNNING_P2P/PRE_COPY_P2P,
  dirty sync)                                 then every device -> STOP/STOP_COPY
save_complete: STOP_COPY data, DONE         STOP_COPY
save_cleanup | save_failed                  -> STOP | -> RUNNING

destination
-----------
load_setup                                  RUNNING -> ... -> RESUMING
load_switchover_ack: pre-copy devices       -
load: chunks strictly in order per device   RESUMING
  (INIT_SENT: that device's initial data
  is loaded)
load_complete: every device validated       every device -> STOP (validates), then
  before any moves on                         every P2P device -> RUNNING_P2P, then
                                              every device -> RUNNING
load_failed                                 reset (RUNNING, sessions gone)

The final RUNNING_P2P -> RUNNING happens in ``load_complete``, once every device has
validated its state: the host starts the vCPUs before it runs ``post_load`` hooks, and
QEMU's own start hooks move the devices before any vCPU resumes.  Devices do no work
until guest time passes, so the destination's digests, taken after ``load_complete``,
still show the state as it arrived.

Device-state chunks are ``DeviceData(id, phase, seq, bytes)``: ``seq`` counts from 0 per
device across PRE_COPY and STOP_COPY chunks and ends with one empty DONE chunk.  With
switchover-ack, a device with pre-copy also sends one empty INIT_SENT chunk (it takes a
``seq`` of its own) right after the chunk that brought its ``initial_bytes`` to 0; later
PRE_COPY chunks (dirty data) may follow it.

Thread safety: the host runs guest time (``advance``) on one thread and the migration on
another; the source engine calls the hooks that overlap running guest time
(``save_setup``, ``save_iterate``, ``pending_bytes``, ``save_failed``) with guest time
held (:meth:`~vmferry.migration.source.GuestControl.held`).  ``report`` reads states
without locks.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from vmferry.clock import Clock
from vmferry.errors import (
    ConfigError,
    DeviceLoadError,
    MalformedRecord,
    MigrationError,
    MigrationRefused,
)
from vmferry.hw.persist import write_version
from vmferry.hw.vfio import (
    DRIVERS,
    ChunkSequencer,
    DeviceCapability,
    DeviceState,
    MigrationFlags,
    VfioError,
    VfioMigrationDevice,
    VmmDevice,
    check_migratable,
    create_device,
    decode_capability,
    encode_capability,
    resume_all,
    switchover,
)
from vmferry.hw.vfio.states import PRE_COPY_STATES
from vmferry.machine.handlers import DeviceData, DevicePhase, MigrationHandler, StatePiece
from vmferry.machine.vm import FEATURES, VM, HostContext

S = DeviceState
#: work items a device processes per second of guest time
TICKS_PER_SECOND = 1000.0
#: at most this many work items per device in one slice of guest time
MAX_TICKS_PER_SLICE = 250
#: pre-copy bytes read from one device per RAM pass, at most
PRECOPY_BUDGET = 64 << 20
#: the platform key listing the VFIO device types a host has (default: every driver)
PLATFORM_KEY = "vfio_drivers"


def host_drivers(host: HostContext) -> frozenset[str]:
    """The VFIO device types ``host`` has (its platform's ``vfio_drivers``)."""
    listed = host.platform.get(PLATFORM_KEY)
    if listed is None:
        return frozenset(DRIVERS)
    if not isinstance(listed, list | tuple) or not all(d in DRIVERS for d in listed):
        raise ConfigError(f"host {host.name}: {PLATFORM_KEY} must list drivers of "
                          f"{sorted(DRIVERS)}, not {listed!r}")  # fmt: skip
    return frozenset(str(d) for d in listed)


def build_devices(entries: object, vm: VM, host: HostContext) -> list[VfioMigrationDevice]:
    """The devices of a ``devices`` definition value, in order; ConfigError if invalid."""
    if not isinstance(entries, list | tuple) or not all(isinstance(e, Mapping) for e in entries):
        raise ConfigError("devices must be a list of device tables")
    have = host_drivers(host)
    seen: set[str] = set()
    out: list[VfioMigrationDevice] = []
    for entry in entries:
        spec = dict(entry)
        migration = spec.pop("migration", True)
        host_device = spec.pop("host_device", None)
        if not isinstance(migration, bool):
            raise ConfigError(f"device {spec.get('id')!r}: migration must be a bool")
        device = create_device(spec, vm.device_memory(str(spec.get("id"))))
        if device.name in seen:
            raise ConfigError(f"device id {device.name!r} appears twice")
        seen.add(device.name)
        driver = str(spec["driver"])
        if driver not in have:
            raise ConfigError(f"device {device.name}: host {host.name} has no {driver} "
                              f"device (it has {sorted(have) or 'none'})")  # fmt: skip
        if not migration:  # the same hardware, bound to a driver without migration ops
            device = VfioMigrationDevice(None, name=device.name)
        if host_device is not None:
            assign(device.name, host_device, host)
        out.append(device)
    return out


def assign(device: str, host_device: object, host: HostContext) -> int:
    """The IOMMU group of the host function a VM device is assigned; ConfigError when the
    host's boot probe did not make it usable."""
    probe = host.iommu
    if not isinstance(host_device, str):
        raise ConfigError(f"device {device}: host_device must be a string")
    if probe is None:
        raise ConfigError(f"device {device}: host {host.name} has no IOMMU topology to "
                          f"assign {host_device} from")
    if host_device in probe.failures:
        raise ConfigError(f"device {device}: host {host.name} cannot assign {host_device}: "
                          f"{probe.failures[host_device]}")
    group = probe.groups.get(host_device)
    if group is None:
        raise ConfigError(f"device {device}: {host_device} is not an IOMMU-backed device "
                          f"of host {host.name}")
    return int(group)


def setup_devices(vm: VM, extra: Mapping[str, Any], host: HostContext) -> None:
    """The ``devices`` feature hook: build the devices and their handler."""
    vm.add_handler(VfioHandler(build_devices(extra["devices"], vm, host), host_drivers(host)))


def _fail(device: str, action: str, exc: VfioError) -> MigrationError:
    return MigrationError(f"VFIO device {device}: {action} failed: {exc}")


class VfioHandler(MigrationHandler):
    """Every VFIO device of one VM (see the module docstring)."""

    name = "vfio"

    def __init__(
        self, devices: Sequence[VfioMigrationDevice], drivers: frozenset[str] = frozenset(DRIVERS)
    ) -> None:
        self.devices: dict[str, VfioMigrationDevice] = {d.name: d for d in devices}
        self.drivers = drivers
        self._vmms: dict[str, VmmDevice] = {}
        self._seq: dict[str, int] = {}
        self._sequencer = ChunkSequencer()
        self._phase: dict[str, DevicePhase] = {}
        self._credit = 0.0
        self.bytes_saved: dict[str, int] = {}
        self.bytes_loaded: dict[str, int] = {}
        #: switchover-ack: devices whose INIT_SENT marker is still to send (source) or
        #: to load (destination)
        self._init_due: set[str] = set()
        #: source: the engine's clock (:meth:`timed_by`), and per device the last save
        #: of its state that pre-copy timed (s): entering PRE_COPY, or a precopy-info
        #: query that started one (see :meth:`stop_cost_s`)
        self._clock: Clock | None = None
        self.save_s: dict[str, float] = {}

    @property
    def device_ids(self) -> frozenset[str]:
        return frozenset(self.devices)

    def device_kinds(self) -> frozenset[str]:
        return frozenset(d.driver.name for d in self.devices.values() if d.driver is not None)

    # --- both sides ------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        self._credit += seconds * TICKS_PER_SECOND
        ticks = int(self._credit)
        self._credit -= ticks
        ticks = min(ticks, MAX_TICKS_PER_SLICE)
        for device in self.devices.values():
            if device.driver is not None and device.is_open:
                device.run(ticks)

    def state_digest(self) -> str | None:
        """``id:digest`` per device (devices with migration support), ``;``-separated."""
        parts = [f"{i}:{d.state_digest()}" for i, d in sorted(self.devices.items())
                 if d.driver is not None]  # fmt: skip
        return ";".join(parts) if parts else None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ident, dev in self.devices.items():
            if dev.driver is None:
                out[ident] = {"migration": False}
                continue
            out[ident] = {
                "driver": dev.driver.name,
                "state": dev.state.name,
                "flags": _flag_names(dev.driver.flags),
                "dma_writes": dev.driver.dma_writes,
            }
        return {"devices": out}

    def post_load(self) -> dict[str, Any]:
        self._vmms = {}  # committed: the devices belong to the running VM now
        return {"devices": {i: d.state.name for i, d in self.devices.items()
                            if d.driver is not None}}  # fmt: skip

    # --- pre-flight --------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        """The device types this host has, the newest version of each type's saved state
        it reads and, per device, what it can load."""
        return {
            "drivers": sorted(self.drivers),
            "state_versions": {d: DRIVERS[d].STATE_VERSION for d in sorted(self.drivers)},
            "devices": {i: encode_capability(d.capability()).hex()
                        for i, d in self.devices.items() if d.driver is not None},
        }  # fmt: skip

    def preflight(
        self, destination: Mapping[str, Any] | None, options: Mapping[str, Any]
    ) -> list[str]:
        """QEMU's blockers (both compat modes), then what the destination can host."""
        vmms = self._source_vmms()
        check_migratable(list(vmms.values()))
        self._negotiate_versions(destination)
        if destination is None:
            return ["VFIO: the destination did not describe its devices; their state is "
                    "checked only when it loads"]  # fmt: skip
        dest_caps = self._destination_caps(destination)
        full = options.get("compat", "preflight") == "preflight"
        for ident, vmm in vmms.items():
            mine = vmm.device.capability()
            theirs = dest_caps.get(ident)
            if mine.driver not in destination.get("drivers", ()) or theirs is None:
                raise MigrationRefused(f"VFIO device {ident}: the destination cannot host a "
                                       f"{mine.driver} device")  # fmt: skip
            reason = theirs.refusal(mine) if full else _type_refusal(theirs, mine)
            if reason is not None:
                raise MigrationRefused(f"VFIO device {ident}: destination cannot host it: "
                                       f"{reason}")  # fmt: skip
        return []

    def _negotiate_versions(self, destination: Mapping[str, Any] | None) -> None:
        """Each device writes the newest state version its driver and the destination's
        both read: version 1 for a destination that announces no versions (a release
        before the announcement) or none for that driver; the newest without a
        destination (a snapshot, restored by this release)."""
        announced = None if destination is None else destination.get("state_versions")
        if announced is not None and not isinstance(announced, Mapping):
            raise MigrationRefused(f"VFIO: unreadable destination state versions: "
                                   f"{announced!r}")  # fmt: skip
        chosen: dict[str, int] = {}
        for ident in self._vmms:
            driver = self.devices[ident].driver
            assert driver is not None  # _source_vmms refused a device without one
            if destination is None:
                chosen[ident] = driver.STATE_VERSION
                continue
            readable = None if announced is None else announced.get(driver.name, 1)
            try:
                chosen[ident] = write_version(f"{driver.name} device", driver.STATE_VERSION,
                                              readable)  # fmt: skip
            except MalformedRecord as exc:
                raise MigrationRefused(f"VFIO device {ident}: {exc}") from exc
        for ident, version in chosen.items():
            driver = self.devices[ident].driver
            assert driver is not None
            driver.write_version = version

    def _destination_caps(self, destination: Mapping[str, Any]) -> dict[str, DeviceCapability]:
        raw = destination.get("devices", {})
        out: dict[str, DeviceCapability] = {}
        try:
            for ident, hexed in dict(raw).items():
                out[str(ident)] = decode_capability(bytes.fromhex(hexed))
        except (MalformedRecord, ValueError, TypeError) as exc:
            raise MigrationRefused(f"VFIO: unreadable destination capabilities: {exc}") from exc
        return out

    def _source_vmms(self) -> dict[str, VmmDevice]:
        """One VMM driver per device; refuses a device without migration support or one
        not RUNNING (a device in ERROR needs a reset first)."""
        if self._vmms:
            return self._vmms
        vmms: dict[str, VmmDevice] = {}
        for ident, dev in self.devices.items():
            if dev.driver is None:
                raise MigrationRefused(f"VFIO device {ident} has no migration support "
                                       "(its driver offers no migration ops)")  # fmt: skip
            if dev.state != S.RUNNING:
                raise MigrationRefused(f"VFIO device {ident} is {dev.state.name}, not RUNNING")
            vmms[ident] = VmmDevice(dev)
        self._vmms = vmms
        self._init_due = set()
        self._seq = dict.fromkeys(vmms, 0)
        self.bytes_saved = dict.fromkeys(vmms, 0)
        return vmms

    # --- source ------------------------------------------------------------------------

    def timed_by(self, clock: Clock) -> None:
        self._clock = clock

    def _now(self) -> float:
        return self._clock.monotonic() if self._clock is not None else 0.0

    def save_setup(self) -> None:
        self.save_s = {}
        for ident, vmm in self._source_vmms().items():
            t0 = self._now()
            try:
                vmm.save_setup()
            except VfioError as exc:
                raise _fail(ident, "entering PRE_COPY", exc) from exc
            if vmm.state in PRE_COPY_STATES:  # the arc saved the device's initial state
                self.save_s[ident] = self._now() - t0

    def save_switchover_ack(self) -> int:
        """Every device in a pre-copy state marks the end of its initial data."""
        self._init_due = {i for i, v in self._vmms.items() if v.state in PRE_COPY_STATES}
        return len(self._init_due)

    def _init_sent(self, ident: str, vmm: VmmDevice) -> list[StatePiece]:
        """The INIT_SENT marker, once, when ``ident``'s initial bytes were all read."""
        if ident not in self._init_due or vmm.state not in PRE_COPY_STATES \
                or vmm.initial_bytes:  # fmt: skip
            return []
        self._init_due.discard(ident)
        return [self._piece(ident, DevicePhase.INIT_SENT, b"")]

    def _piece(self, ident: str, phase: DevicePhase, data: bytes | memoryview) -> DeviceData:
        seq = self._seq[ident]
        self._seq[ident] = seq + 1
        self.bytes_saved[ident] += len(data)
        return DeviceData(ident, phase, seq, data)

    def save_iterate(self) -> Sequence[StatePiece]:
        """Pre-copy data of every device in a PRE_COPY state, until it has none right
        now (devices change only while guest time passes, so this ends) or the budget."""
        out: list[StatePiece] = []
        for ident, vmm in self._vmms.items():
            budget = PRECOPY_BUDGET
            while budget > 0 and vmm.state in PRE_COPY_STATES:
                # the read's precopy-info queries start a save when the device has
                # dirtied state and everything queued was read (as mlx5's do)
                saved, t0 = vmm.saved_bytes(), self._now()
                try:
                    chunk = vmm.save_iterate()
                except VfioError as exc:
                    raise _fail(ident, "reading pre-copy data", exc) from exc
                if vmm.saved_bytes() > saved:
                    self.save_s[ident] = self._now() - t0
                if not chunk:
                    break
                out.append(self._piece(ident, DevicePhase.PRE_COPY, chunk))
                budget -= len(chunk)
            out += self._init_sent(ident, vmm)
        return out

    def pending_bytes(self) -> int:
        """Pre-copy data the devices still report plus their STOP_COPY estimates."""
        total = 0
        for ident, vmm in self._vmms.items():
            try:
                total += vmm.pending() + vmm.data_size()
            except VfioError as exc:
                raise _fail(ident, "querying the data size", exc) from exc
        return total

    def stop_copy_bytes(self) -> int:
        """The devices' STOP_COPY estimates (``MIG_DATA_SIZE``)."""
        total = 0
        for ident, vmm in self._vmms.items():
            try:
                total += vmm.data_size()
            except VfioError as exc:
                raise _fail(ident, "querying the data size", exc) from exc
        return total

    def stop_cost_s(self) -> float:
        """The stop of every device still in pre-copy saves its state once more (mlx5:
        the PRE_COPY_P2P -> STOP_COPY arc runs the same save a precopy-info query starts
        when the device dirtied its state): what the last such save pre-copy timed took,
        per device (the arc into PRE_COPY, a full save, if no query started one).
        Devices without pre-copy stop from RUNNING (their state is read after the stop,
        in the state part)."""
        return sum(self.save_s.get(i, 0.0) for i, v in self._vmms.items()
                   if v.state in PRE_COPY_STATES)  # fmt: skip

    def quiesce(self) -> None:
        """Every device to a P2P state before any device stops (the multi-device rule)."""
        try:
            switchover(list(self._source_vmms().values()))
        except VfioError as exc:
            raise MigrationError(f"VFIO devices could not stop: {exc}") from exc

    def save_complete(self) -> Iterator[StatePiece]:
        """STOP_COPY data then a DONE chunk per device, produced as it is read."""
        for ident, vmm in self._vmms.items():
            try:
                for chunk in vmm.complete_precopy():
                    yield self._piece(ident, DevicePhase.STOP_COPY, chunk)
            except VfioError as exc:
                raise _fail(ident, "reading STOP_COPY data", exc) from exc
            yield self._piece(ident, DevicePhase.DONE, b"")

    def save_cleanup(self) -> None:
        errors = []
        for ident, vmm in self._vmms.items():
            try:
                vmm.save_cleanup()
            except VfioError as exc:
                errors.append(f"{ident}: {exc}")
        self._vmms = {}
        if errors:
            raise MigrationError(f"VFIO cleanup after the migration: {'; '.join(errors)}")

    def save_failed(self) -> None:
        """Give every device back RUNNING (a reset where the device cannot get there)."""
        errors = []
        for ident, vmm in self._vmms.items():
            try:
                vmm.migration_failed()
            except VfioError as exc:
                errors.append(f"{ident}: {exc}")
        self._vmms = {}
        if errors:
            raise MigrationError(f"VFIO devices not back to RUNNING: {'; '.join(errors)}")

    def resume_source(self) -> None:
        """After a snapshot the VM runs on: every device back to RUNNING (reset if it
        cannot get there)."""
        for dev in self.devices.values():
            if dev.driver is None or dev.state == S.RUNNING:
                continue
            try:
                dev.set_state(S.RUNNING)
            except VfioError:
                dev.reset()

    # --- destination -------------------------------------------------------------------

    def load_setup(self) -> None:
        self._sequencer = ChunkSequencer()
        self._init_due = set()
        self._phase = {}
        self.bytes_loaded = dict.fromkeys(self.devices, 0)
        vmms: dict[str, VmmDevice] = {}
        for ident, dev in self.devices.items():
            if dev.driver is None:
                raise DeviceLoadError(f"VFIO device {ident} cannot resume: no migration support")
            vmms[ident] = VmmDevice(dev)
        self._vmms = vmms
        for ident, vmm in vmms.items():
            try:
                vmm.load_setup()
            except VfioError as exc:
                raise DeviceLoadError(f"VFIO device {ident}: entering RESUMING failed: "
                                      f"{exc}") from exc  # fmt: skip

    def load_switchover_ack(self) -> int:
        """Every device with pre-copy sends an INIT_SENT marker before the stop."""
        self._init_due = {i for i, v in self._vmms.items() if v.has_precopy}
        return len(self._init_due)

    def _load_init_sent(self, piece: DeviceData) -> None:
        """A device's initial data is all here (and loaded: chunks load as they come)."""
        if piece.device not in self._init_due:
            raise MalformedRecord(f"{piece.device}: unexpected or repeated INIT_SENT marker")
        if len(piece.data) or self._phase.get(piece.device, DevicePhase.PRE_COPY) \
                is not DevicePhase.PRE_COPY:  # fmt: skip
            raise MalformedRecord(f"{piece.device}: INIT_SENT marker with data or after "
                                  "the pre-copy phase")  # fmt: skip
        self._sequencer.accept(piece.device, piece.seq)
        self._init_due.discard(piece.device)

    def load(self, piece: StatePiece) -> None:
        if not isinstance(piece, DeviceData):
            raise MalformedRecord(f"{self.name} takes device chunks, not {type(piece).__name__}")
        vmm = self._vmms.get(piece.device)
        if vmm is None:
            raise MalformedRecord(f"device chunk for {piece.device} before its load setup")
        if piece.phase is DevicePhase.INIT_SENT:
            self._load_init_sent(piece)
            return
        last = self._phase.get(piece.device, DevicePhase.PRE_COPY)
        if piece.phase < last:
            raise MalformedRecord(f"{piece.device}: {piece.phase.name} chunk after "
                                  f"{last.name} data")  # fmt: skip
        done = piece.phase is DevicePhase.DONE
        if done and len(piece.data):
            raise MalformedRecord(f"{piece.device}: the DONE chunk carries data")
        self._sequencer.accept(piece.device, piece.seq, last=done)
        self._phase[piece.device] = piece.phase
        if done:
            return
        try:
            vmm.load_data(piece.data)
        except VfioError as exc:
            raise DeviceLoadError(f"VFIO device {piece.device} rejected state chunk "
                                  f"#{piece.seq}: {exc}") from exc  # fmt: skip
        self.bytes_loaded[piece.device] += len(piece.data)

    def load_complete(self) -> None:
        """Validate every device (RESUMING -> STOP) before any device moves on, then
        every device to RUNNING_P2P, then every device to RUNNING."""
        missing = sorted(set(self._vmms) - self._sequencer.done)
        if missing:
            raise MalformedRecord(f"VFIO device state incomplete (no DONE chunk): {missing}")
        vmms = list(self._vmms.values())
        for vmm in vmms:
            vmm.load_cleanup()
        for ident, vmm in self._vmms.items():
            try:
                vmm.set_state(S.STOP, recover=S.ERROR)
            except VfioError as exc:
                raise DeviceLoadError(f"VFIO device {ident} rejected its state on load: "
                                      f"{exc}") from exc  # fmt: skip
        try:
            resume_all(vmms)
        except VfioError as exc:
            raise DeviceLoadError(f"VFIO devices could not start: {exc}") from exc

    def load_failed(self) -> None:
        """Reset every device (also those already RUNNING: the VM is discarded)."""
        errors = []
        for ident, vmm in self._vmms.items():
            try:
                vmm.load_failed()
            except VfioError as exc:
                errors.append(f"{ident}: {exc}")
        self._vmms = {}
        if errors:
            raise MigrationError(f"VFIO devices not reset: {'; '.join(errors)}")


def _type_refusal(host: DeviceCapability, incoming: DeviceCapability) -> str | None:
    """What QEMU-compatible mode checks: the device type and its migration features."""
    if incoming.driver != host.driver:
        return f"driver {incoming.driver!r} state cannot load into a {host.driver!r} device"
    if incoming.flags != host.flags:
        return (f"migration flags differ: source {_flag_names(incoming.flags)}, "
                f"destination {_flag_names(host.flags)}")  # fmt: skip
    return None


def _flag_names(flags: MigrationFlags) -> str:
    return "|".join(f.name or "" for f in MigrationFlags if f & flags)


__all__ = [
    "PLATFORM_KEY",
    "TICKS_PER_SECOND",
    "DeviceLoadError",
    "VfioHandler",
    "build_devices",
    "host_drivers",
    "setup_devices",
]


FEATURES["devices"] = setup_devices
