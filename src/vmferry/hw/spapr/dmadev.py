"""A receive-DMA engine behind the sPAPR IOMMU: a device that writes guest buffers.

Theory of operation
-------------------
The device works like a network card's receive ring.  The guest driver maps a ring and a
set of buffers through the TCE hypercalls and programs the ring's IOBA and size into the
device's registers.  Each descriptor of the ring (big-endian, in guest memory) is::

    ioba u64 | cookie u64 (driver-private) | len u32 | flags u32 | seq u64     (32 bytes)

``flags``: POSTED (0x1, the driver gave the buffer to the device), DONE (0x2, the device
filled it).  While it runs, the device takes descriptors in ring order at its configured
rate: it *reads* the descriptor by DMA, *writes* ``len`` bytes of payload to the buffer
IOBA by DMA, then writes the descriptor back by DMA (DONE, the payload's sequence number).
Every access goes through the hardware TCE tables (:meth:`SpaprIommu.dma_read` /
:meth:`SpaprIommu.dma_write`): an unmapped or read-only IOBA is refused before a byte
lands, the IOMMU records the fault, and the device halts (as a PE freezes on an EEH
error) until it is reset.

The payload of the buffer with sequence number ``s`` is the 16-byte unit
``tag u64 | s u64`` repeated, so a guest can tell exactly which DMA reached a page.

Persist contract: :meth:`SpaprDmaEngine.save` -> :class:`DmaEngineState` (the device's
registers); :meth:`SpaprDmaEngine.restore`; :func:`encode_state` / :func:`decode_state`::

    "SDMA" | u16 version=1 | u32 liobn | u64 ring_ioba | u32 ring_size | u32 head
    | u64 seq | u64 bytes | u32 faults | u16 len | halt reason (utf-8, len bytes)
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np

from vmferry.errors import MalformedRecord
from vmferry.hw.persist import Field, Layout
from vmferry.hw.spapr.iommu import SpaprIommu
from vmferry.hw.spapr.tce import DmaFault, SpaprError

RING_HEADER: Final = 64
DESC_SIZE: Final = 32
DESC_POSTED: Final = 0x1
DESC_DONE: Final = 0x2
MAX_RING: Final = 1024
MAX_BUFFER: Final = 1 << 20
PAYLOAD_UNIT: Final = 16
_DESC = struct.Struct(">QQIIQ")
_WRITEBACK = struct.Struct(">IIQ")  # len | flags | seq, at descriptor offset 16
MAGIC = b"SDMA"
VERSION = 1
#: the device's registers in the stream (the persist codec of :mod:`vmferry.hw.persist`)
STATE_LAYOUT = Layout("dma device", MAGIC, VERSION, (
    Field("liobn", "u32"), Field("ring_ioba", "u64"), Field("ring_size", "u32"),
    Field("head", "u32"), Field("seq", "u64"), Field("bytes", "u64"), Field("faults", "u32"),
    Field("halted", "str16"),
))


class DmaDeviceError(SpaprError):
    """A DMA device was programmed or restored with values it cannot take."""


@dataclass(frozen=True)
class Descriptor:
    ioba: int
    cookie: int
    length: int
    flags: int
    seq: int

    @classmethod
    def unpack(cls, data: bytes) -> Descriptor:
        return cls(*_DESC.unpack(data))

    def pack(self) -> bytes:
        return _DESC.pack(self.ioba, self.cookie, self.length, self.flags, self.seq)


def desc_offset(index: int) -> int:
    """Byte offset of descriptor ``index`` from the ring's start."""
    return RING_HEADER + index * DESC_SIZE


def ring_bytes(size: int) -> int:
    return RING_HEADER + size * DESC_SIZE


def payload(tag: int, seq: int, length: int) -> bytes:
    """What the device writes into the buffer of DMA number ``seq``."""
    unit = np.frombuffer(struct.pack(">QQ", tag, seq), dtype=np.uint8)
    return np.tile(unit, length // PAYLOAD_UNIT).tobytes()


@dataclass(frozen=True)
class DmaEngineState:
    liobn: int
    ring_ioba: int
    ring_size: int
    head: int
    seq: int
    bytes: int
    faults: int
    halted: str


class SpaprDmaEngine:
    """One DMA device in IOMMU group ``group``, DMAing through window ``liobn``."""

    def __init__(
        self, iommu: SpaprIommu, *, liobn: int, group: int, tag: int, rate_mbps: float
    ) -> None:
        if rate_mbps <= 0:
            raise DmaDeviceError(f"DMA rate must be positive, not {rate_mbps}")
        self.iommu, self.liobn, self.group = iommu, liobn, group
        self.tag, self.rate_mbps = tag, rate_mbps
        self.ring_ioba = 0
        self.ring_size = 0
        self.head = 0
        self.seq = 0
        self.bytes = 0
        self.faults = 0
        self.halted = ""
        self._budget = 0.0

    @property
    def programmed(self) -> bool:
        return self.ring_size > 0

    def program(self, ring_ioba: int, ring_size: int) -> None:
        """The driver writes the ring registers (and so resets the device)."""
        if not 0 < ring_size <= MAX_RING or ring_ioba < 0 or ring_ioba & (DESC_SIZE - 1):
            raise DmaDeviceError(f"ring {ring_ioba:#x} x {ring_size} not acceptable")
        self.ring_ioba, self.ring_size, self.head = ring_ioba, ring_size, 0
        self.halted, self._budget = "", 0.0

    # --- running -----------------------------------------------------------------------

    def run(self, seconds: float) -> int:
        """Let ``seconds`` of device time pass; returns the buffers filled."""
        if not self.programmed or self.halted or seconds <= 0:
            return 0
        self._budget += self.rate_mbps * 1e6 * seconds
        done = 0
        while done < self.ring_size and not self.halted:
            desc = self._read_desc()
            if desc is None or not desc.flags & DESC_POSTED or desc.flags & DESC_DONE:
                self._budget = min(self._budget, float(MAX_BUFFER))  # stalled: no credit
                break
            if desc.length > self._budget:
                break
            if not self._fill(desc):
                break
            self._budget -= desc.length
            done += 1
        return done

    def _read_desc(self) -> Descriptor | None:
        data = self._dma(
            lambda: self.iommu.dma_read(
                self.liobn, self.ring_ioba + desc_offset(self.head), DESC_SIZE, group=self.group
            )
        )
        return None if data is None else Descriptor.unpack(data)

    def _fill(self, desc: Descriptor) -> bool:
        if not 0 < desc.length <= MAX_BUFFER or desc.length % PAYLOAD_UNIT:
            self.halted = f"descriptor {self.head}: bad length {desc.length}"
            return False
        seq = self.seq + 1
        data = payload(self.tag, seq, desc.length)
        if (
            self._dma(lambda: self.iommu.dma_write(self.liobn, desc.ioba, data, group=self.group))
            is None
        ):
            return False
        back = _WRITEBACK.pack(desc.length, DESC_DONE, seq)
        where = self.ring_ioba + desc_offset(self.head) + 16
        if (
            self._dma(lambda: self.iommu.dma_write(self.liobn, where, back, group=self.group))
            is None
        ):
            return False
        self.seq, self.bytes = seq, self.bytes + desc.length
        self.head = (self.head + 1) % self.ring_size
        return True

    def _dma(self, access: Callable[[], bytes | None]) -> bytes | None:
        """Run one DMA; a refused one halts the device (the IOMMU recorded the fault)."""
        try:
            out = access()
        except DmaFault as fault:
            self.faults += 1
            self.halted = str(fault)
            return None
        return b"" if out is None else out

    # --- persist -----------------------------------------------------------------------

    def save(self) -> DmaEngineState:
        return DmaEngineState(
            self.liobn,
            self.ring_ioba,
            self.ring_size,
            self.head,
            self.seq,
            self.bytes,
            self.faults,
            self.halted,
        )

    def restore(self, state: DmaEngineState) -> None:
        if state.liobn != self.liobn:
            raise DmaDeviceError(
                f"state for liobn {state.liobn:#x}, device sits behind {self.liobn:#x}"
            )
        if state.ring_size > MAX_RING or (state.ring_size and state.head >= state.ring_size):
            raise DmaDeviceError(f"head {state.head} outside a ring of {state.ring_size}")
        self.ring_ioba, self.ring_size, self.head = state.ring_ioba, state.ring_size, state.head
        self.seq, self.bytes, self.faults = state.seq, state.bytes, state.faults
        self.halted, self._budget = state.halted, 0.0


def encode_state(state: DmaEngineState) -> bytes:
    return STATE_LAYOUT.encode(dataclasses.asdict(state))


def decode_state(data: bytes) -> DmaEngineState:
    """Strict decode: malformed bytes raise a StreamDecodeError subclass."""
    v = STATE_LAYOUT.decode(data)
    size, head = v["ring_size"], v["head"]
    if size > MAX_RING or (size and head >= size):
        raise MalformedRecord(f"dma device state: head {head} of a {size}-entry ring", 0)
    return DmaEngineState(v["liobn"], v["ring_ioba"], size, head, v["seq"], v["bytes"],
                          v["faults"], v["halted"])
