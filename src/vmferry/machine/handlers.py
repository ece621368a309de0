"""Migration handlers: how a VM's parts beyond RAM and core registers take part in a
migration (in the spirit of QEMU's SaveVMHandlers).

The engine calls every handler of a VM at fixed points, in registration order:

source                                            destination
------                                            -----------
capabilities()  (on the destination, for pre-flight, before anything moves)
preflight(dest_caps, options)   raise MigrationRefused; return warnings
vm_start()                      (outside migrations too) the vCPUs are about to run
timed_by(clock)                 the engine's clock, for handlers that time their devices
save_setup()                    (RAM pass 1 begins)
save_switchover_ack() -> n      switchover-ack on: n INIT_SENT markers will follow
save_iterate() -> pieces        once per pass (pre-copy data)
pending_bytes()                 counted in the expected downtime
stop_cost_s()                   what quiesce() will cost, as pre-copy timed it
quiesce()                       vCPUs paused; before the final dirty sync
save_complete() -> pieces       after the final RAM pass (may be lazy: an iterator)
save_cleanup() | save_failed()  after commit | on any failure (give it back)
resume_source()                 after a snapshot: the saved VM runs on (give it back)
                                                  load_setup()   VM configuration arrived
                                                  load_switchover_ack() -> n markers due
                                                  load(piece)    each piece, in order
                                                  load_complete()  before the vCPUs start
                                                  load_failed()  on any failure
                                                  post_load() -> report  after resume

Pieces are neutral (:class:`DeviceData`, :class:`ComponentData`); the engine turns them into
stream records and back.  A destination routes a :class:`DeviceData` to the handler whose
``device_ids`` contain it and a :class:`ComponentData` to the handler of that name.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias

from vmferry.clock import Clock
from vmferry.errors import MalformedRecord


class DevicePhase(enum.IntEnum):
    """Which part of a device's migration a device-state chunk belongs to."""

    PRE_COPY = 1  # read while the device runs (PRE_COPY state)
    STOP_COPY = 2  # read once the device stopped (STOP_COPY state)
    DONE = 3  # no more data for this device (empty chunk)
    #: the device's pre-copy initial data was all sent (empty chunk, one per device,
    #: only with switchover-ack: QEMU's VFIO_MIG_FLAG_DEV_INIT_DATA_SENT)
    INIT_SENT = 4


@dataclass(frozen=True)
class DeviceData:
    device: str
    phase: DevicePhase
    seq: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class ComponentData:
    name: str
    data: bytes | bytearray | memoryview


@dataclass(frozen=True)
class ArchState:
    """Architecture state with a stream record type of its own (an x86-64 vCPU's KVM state,
    the KVM clock): ``kind`` names the record type, ``data`` is its documented payload.
    The destination routes it to the handler whose ``arch_kinds`` contain ``kind``."""

    kind: str
    data: bytes


StatePiece: TypeAlias = DeviceData | ComponentData | ArchState


class Component(Protocol):
    """The simple case: one state blob saved at switchover, loaded before resume."""

    name: str

    def save_state(self) -> bytes:
        """Encode the component's state; cannot fail."""

    def load_state(self, data: bytes) -> None:
        """Rebuild from :meth:`save_state` output; raises a typed error on bad data."""


class MigrationHandler:
    """Base class: every hook is a no-op, so a handler overrides only what it needs."""

    name = "handler"

    @property
    def device_ids(self) -> frozenset[str]:
        return frozenset()

    #: the :class:`ArchState` kinds this handler saves and loads
    arch_kinds: frozenset[str] = frozenset()

    # --- both sides ------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Guest time passes (devices run, DMA happens)."""

    def vm_start(self) -> None:
        """The vCPUs are about to run: the first start on a host, a resume, the source
        taking the guest back after a failed migration.  Raise to keep them stopped."""

    def report(self) -> dict[str, Any]:
        return {}

    def state_digest(self) -> str | None:
        """A digest of the migrated state, compared across hosts at switchover."""
        return None

    # --- source ----------------------------------------------------------------------
    def capabilities(self) -> dict[str, Any]:
        """What this host can accept (computed on the destination for pre-flight)."""
        return {}

    def preflight(self, destination: Mapping[str, Any] | None,
                  options: Mapping[str, Any]) -> list[str]:
        """Decide before anything moves; raise MigrationRefused, or return warnings."""
        return []

    def save_setup(self) -> None:
        pass

    def save_switchover_ack(self) -> int:
        """Switchover-ack is on (after ``save_setup``): how many :class:`DevicePhase`
        INIT_SENT markers this handler will send from ``save_iterate`` (0: it needs no
        acknowledgement before the stop)."""
        return 0

    def save_iterate(self) -> Sequence[StatePiece]:
        return ()

    def pending_bytes(self) -> int:
        return 0

    def device_kinds(self) -> frozenset[str]:
        """The kinds (drivers) of this handler's devices, for rates measured per kind."""
        return frozenset()

    def stop_copy_bytes(self) -> int:
        """Of :meth:`pending_bytes`, the device state that moves after the stop and that
        the destination's devices load then (its load time is downtime)."""
        return 0

    def quiesce(self) -> None:
        pass

    def timed_by(self, clock: Clock) -> None:
        """The engine's clock (the source session gives it before ``save_setup``), for a
        handler that times its devices' work in pre-copy (:meth:`stop_cost_s`)."""

    def stop_cost_s(self) -> float:
        """What :meth:`quiesce` is expected to cost (s), as pre-copy timed the same work
        on the same devices (call with guest time held); 0.0: nothing to time."""
        return 0.0

    def save_complete(self) -> Iterable[StatePiece]:
        """The state left at switchover; an iterator lets the engine send it in
        batches while it is read (large device states)."""
        return ()

    def save_cleanup(self) -> None:
        pass

    def save_failed(self) -> None:
        pass

    def resume_source(self) -> None:
        """The state was saved but the VM stays here and runs on (a snapshot): undo what
        saving stopped (devices back to RUNNING)."""

    # --- destination -----------------------------------------------------------------
    def load_setup(self) -> None:
        pass

    def load_switchover_ack(self) -> int:
        """Switchover-ack is on (after ``load_setup``): how many INIT_SENT markers this
        handler must load before the destination may approve the stop."""
        return 0

    def load(self, piece: StatePiece) -> None:
        raise MalformedRecord(f"{self.name} takes no {type(piece).__name__}")

    def load_complete(self) -> None:
        pass

    def load_failed(self) -> None:
        pass

    def post_load(self) -> dict[str, Any]:
        return {}


class BlobHandler(MigrationHandler, abc.ABC):
    """A handler whose state is one blob, saved at switchover: ``load`` keeps the blob,
    ``load_complete`` hands it to :meth:`apply` (which raises to fail the load), and
    ``load_failed`` drops it."""

    _pending: bytes | None = None

    def load(self, piece: StatePiece) -> None:
        if not isinstance(piece, ComponentData) or self._pending is not None:
            raise MalformedRecord(f"{self.name}: unexpected or repeated state")
        self._pending = bytes(piece.data)

    def load_complete(self) -> None:
        if self._pending is None:
            raise MalformedRecord(f"{self.name}: no state arrived")
        data, self._pending = self._pending, None
        self.apply(data)

    def load_failed(self) -> None:
        self._pending = None

    @abc.abstractmethod
    def apply(self, data: bytes) -> None:
        """Rebuild from the blob; a typed error fails the load."""


class ComponentHandler(BlobHandler):
    """Adapts a :class:`Component` to the handler interface."""

    def __init__(self, component: Component) -> None:
        self.component = component
        self.name = component.name

    def save_complete(self) -> Sequence[StatePiece]:
        return (ComponentData(self.name, self.component.save_state()),)

    def apply(self, data: bytes) -> None:
        self.component.load_state(data)

    def report(self) -> dict[str, Any]:
        report = getattr(self.component, "report", None)
        return dict(report()) if callable(report) else {}
