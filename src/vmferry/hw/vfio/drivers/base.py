"""What every reference variant driver shares: arcs, sessions and a running device.

Theory of operation
-------------------
The VFIO core (:mod:`vmferry.hw.vfio.device`) walks a request one arc at a time and calls
:meth:`VariantDriver.step` for each.  ``step`` reads the arc's session effect from
:data:`vmferry.hw.vfio.fsm.ARCS` and performs it in the driver's own way through hooks
(``_save_open``, ``_save_final``, ``_resume_write``, ``_resume_commit``); it also moves the
hardware's *activity*: ACTIVE in RUNNING/PRE_COPY (the device makes progress and issues
DMA into guest RAM), P2P_QUIESCED in the P2P states and STOPPED elsewhere (no DMA, no
internal progress).  ``saving``/``resuming`` hold the driver's own reference to the live
session file; ending a session disables the file and drops that reference.

Hardware progress is deterministic: ``run(ticks)`` advances an ACTIVE device; each tick's
randomness is a hash of (seed, tick counter), and both live in the device state, so a
migrated device continues exactly as the source would have.

Faults (named, off by default) reproduce driver bugs:

* ``stale_fd``: a session ends without disabling its file (use after orphan);
* ``resume_accept_any``: RESUMING -> STOP loads whatever was written, unvalidated;
* ``corrupt_save``: the final saved data has one byte flipped (a firmware that saves a
  bad image): the resuming device must reject it when it validates.
"""

from __future__ import annotations

import errno
import struct
from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import xxhash

from vmferry.errors import ConfigError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.vfio.errors import VfioError
from vmferry.hw.vfio.fsm import Session
from vmferry.hw.vfio.states import DeviceState, MigrationFlags
from vmferry.hw.vfio.stream import DataStream, DisabledRead, PrecopyInfo, StreamKind, StreamOwner

S = DeviceState

DRIVER_FAULTS = ("stale_fd", "resume_accept_any", "corrupt_save")


class Activity(Enum):
    ACTIVE = "active"  # internal progress and DMA
    P2P_QUIESCED = "p2p-quiesced"  # no new DMA initiated
    STOPPED = "stopped"  # no DMA, no interrupts, no internal progress


ACTIVITY: dict[DeviceState, Activity] = {
    S.RUNNING: Activity.ACTIVE,
    S.PRE_COPY: Activity.ACTIVE,
    S.RUNNING_P2P: Activity.P2P_QUIESCED,
    S.PRE_COPY_P2P: Activity.P2P_QUIESCED,
    S.STOP: Activity.STOPPED,
    S.STOP_COPY: Activity.STOPPED,
    S.RESUMING: Activity.STOPPED,
    S.ERROR: Activity.STOPPED,
}


@dataclass(frozen=True)
class DeviceCapability:
    """What a destination must match to host a device's migration state."""

    driver: str
    flags: MigrationFlags
    data_size: int
    #: driver-specific identity the state depends on (state size, queue layout, ...)
    compat: tuple[tuple[str, int], ...]

    def refusal(self, incoming: DeviceCapability) -> str | None:
        """Why a device described by ``self`` cannot load ``incoming``'s state, or None."""
        if incoming.driver != self.driver:
            return f"driver {incoming.driver!r} state cannot load into a {self.driver!r} device"
        if incoming.flags != self.flags:
            return (f"migration flags differ: source {int(incoming.flags):#x}, "
                    f"destination {int(self.flags):#x}")  # fmt: skip
        if incoming.compat != self.compat:
            return f"device layout differs: source {incoming.compat}, destination {self.compat}"
        return None

    def as_dict(self) -> dict[str, object]:
        return {"driver": self.driver, "flags": int(self.flags), "data_size": self.data_size,
                "compat": dict(self.compat)}  # fmt: skip


@dataclass(frozen=True)
class DmaRegion:
    gpa: int
    size: int


def tick_word(seed: int, tick: int, salt: int = 0) -> int:
    """The deterministic 64-bit random word of one tick."""
    return xxhash.xxh64_intdigest(struct.pack("<QQQ", seed, tick, salt))


class VariantDriver(ABC):
    """A migration variant driver plus the device it drives."""

    name: ClassVar[str]
    flags: MigrationFlags
    disabled_read: ClassVar[DisabledRead] = "enodev"
    #: errno of any SET while the device sits in ERROR (pds short-circuits with EIO)
    error_state_errno: ClassVar[int] = errno.EINVAL
    DMA_SLOT: ClassVar[int] = 64
    #: the newest version of the device's saved state this driver reads and writes; a
    #: destination announces it at pre-flight (``machine.vfio``), the source writes
    #: ``write_version`` = the newest both read
    STATE_VERSION: ClassVar[int] = 1

    def __init__(self, memory: GuestMemory, dma: DmaRegion, seed: int) -> None:
        if dma.size < self.DMA_SLOT or dma.gpa < 0 or dma.gpa + dma.size > memory.size:
            raise ConfigError(
                f"dma_region [{dma.gpa:#x}, +{dma.size:#x}) does not fit guest memory of "
                f"{memory.size:#x} bytes (need >= {self.DMA_SLOT})"
            )
        self.memory = memory
        self.dma = dma
        self.seed = seed
        self.activity = Activity.ACTIVE
        self.faults: frozenset[str] = frozenset()
        #: invariant: the driver's reference to the live saving/resuming file, or None
        self.saving: DataStream | None = None
        self.resuming: DataStream | None = None
        #: every arc executed, in order (for tests and tracing)
        self.arcs_seen: list[tuple[DeviceState, DeviceState]] = []
        self.dma_writes = 0
        #: data-transfer sessions opened so far (numbers the stream files per device)
        self.sessions = 0
        #: the version of the state the next saving session writes
        self.write_version = self.STATE_VERSION

    # --- hardware -------------------------------------------------------------------------

    def run(self, ticks: int) -> int:
        """Advance the device ``ticks`` times; returns how many ticks made progress."""
        return sum(self.step_hw() for _ in range(ticks))

    def step_hw(self) -> bool:
        if self.activity is not Activity.ACTIVE:
            return False
        self._advance()
        return True

    def dma_write(self, slot: int, data: bytes) -> None:
        """Device-initiated DMA into guest RAM (only while ACTIVE)."""
        if self.activity is not Activity.ACTIVE:
            raise VfioError(errno.EIO, f"{self.name}: DMA issued while {self.activity.value}")
        slots = self.dma.size // self.DMA_SLOT
        self.memory.write(self.dma.gpa + (slot % slots) * self.DMA_SLOT, data[: self.DMA_SLOT])
        self.dma_writes += 1

    @abstractmethod
    def _advance(self) -> None:
        """One tick of device work: internal state changes and DMA."""

    @abstractmethod
    def state_digest(self) -> str:
        """Hex digest of the device's internal state (equal digests = equal state)."""

    @abstractmethod
    def data_size(self) -> int:
        """``stop_copy_length``: estimate of the bytes STOP_COPY produces."""

    @abstractmethod
    def capability(self) -> DeviceCapability: ...

    @abstractmethod
    def hw_reset(self) -> None:
        """Function-level reset of the device's internal state."""

    # --- arcs -------------------------------------------------------------------------------

    def step(
        self, owner: StreamOwner, cur: DeviceState, nxt: DeviceState, effect: Session
    ) -> DataStream | None:
        """Perform one arc; returns a new session file only for session-opening arcs."""
        self.arcs_seen.append((cur, nxt))
        result: DataStream | None = None
        if effect is Session.OPEN_SAVING:
            result = self._open_saving(owner, precopy=nxt != S.STOP_COPY)
            if nxt == S.STOP_COPY and "corrupt_save" in self.faults:
                result.corrupt_tail()
        elif effect is Session.OPEN_RESUMING:
            result = self._open_resuming(owner)
        elif effect is Session.FINAL:
            self.activity = Activity.STOPPED
            self._save_final(self._live(self.saving))
            if "corrupt_save" in self.faults:
                self._live(self.saving).corrupt_tail()
        elif effect is Session.END_SAVING:
            self._end_saving(cur)
        elif effect is Session.END_RESUMING:
            self._end_resuming()
        self.activity = ACTIVITY[nxt]
        return result

    def _live(self, stream: DataStream | None) -> DataStream:
        if stream is None:
            raise VfioError(errno.EINVAL, f"{self.name}: no live session for this arc")
        return stream

    def _open_saving(self, owner: StreamOwner, *, precopy: bool) -> DataStream:
        self._drop("saving")
        self.sessions += 1
        stream = DataStream(StreamKind.SAVING, owner, f"{self.name}-save#{self.sessions}",
                            disabled_read=self.disabled_read)  # fmt: skip
        stream.phase = "precopy" if precopy else "final"
        self._save_open(stream, precopy=precopy)
        stream.get()  # the driver's own reference
        self.saving = stream
        return stream

    def _open_resuming(self, owner: StreamOwner) -> DataStream:
        self._drop("resuming")
        self.sessions += 1
        stream = DataStream(StreamKind.RESUMING, owner, f"{self.name}-resume#{self.sessions}",
                            disabled_read=self.disabled_read)  # fmt: skip
        self._resume_open(stream)
        stream.get()
        self.resuming = stream
        return stream

    def _end_saving(self, cur: DeviceState) -> None:
        stream = self.saving
        if stream is not None and cur != S.STOP_COPY and stream.errored:
            raise VfioError(errno.EIO, f"{self.name}: pre-copy file in error")
        self._drop("saving")

    def _end_resuming(self) -> None:
        stream = self._live(self.resuming)
        if "resume_accept_any" in self.faults:
            self._resume_load_unchecked(stream)
        else:
            self._resume_commit(stream)
        self._drop("resuming")

    def _drop(self, which: str) -> None:
        """End a session: disable the file and drop the driver's reference."""
        stream = self.saving if which == "saving" else self.resuming
        if which == "saving":
            self.saving = None
        else:
            self.resuming = None
        if stream is None or "stale_fd" in self.faults:
            return  # stale_fd: forgotten but left live (and referenced)
        stream.disable()
        stream.put()

    def drop_sessions(self) -> None:
        self._drop("saving")
        self._drop("resuming")

    # --- per-driver session hooks -------------------------------------------------------

    @abstractmethod
    def _save_open(self, stream: DataStream, *, precopy: bool) -> None:
        """Fill a new saving stream (initial pre-copy data, or the whole state)."""

    @abstractmethod
    def _save_final(self, stream: DataStream) -> None:
        """Pre-copy -> STOP_COPY: queue the final data on the same stream."""

    def precopy_query(self, stream: DataStream, state: DeviceState) -> PrecopyInfo:
        """initial/dirty bytes of a saving stream in a PRE_COPY state (lock held)."""
        if stream.pos < stream.initial_total:
            return PrecopyInfo(stream.initial_total - stream.pos, 0)
        return PrecopyInfo(0, stream.buffered)

    @abstractmethod
    def _resume_open(self, stream: DataStream) -> None:
        """Prepare a resuming stream (allocate buffers, reset a parser)."""

    @abstractmethod
    def resume_write(self, stream: DataStream, data: memoryview) -> int:
        """Accept resume bytes (state_mutex and file lock held); returns count taken."""

    @abstractmethod
    def _resume_commit(self, stream: DataStream) -> None:
        """RESUMING -> STOP: validate the whole stream and load it, or raise."""

    @abstractmethod
    def _resume_load_unchecked(self, stream: DataStream) -> None:
        """Faulty mode: load whatever bytes arrived, without validation."""
