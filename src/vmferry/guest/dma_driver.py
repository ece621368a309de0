"""A pseries guest driver for a receive-DMA device (:mod:`vmferry.hw.spapr.dmadev`).

Theory of operation
-------------------
The driver keeps *all* of its state in guest memory, as a guest kernel does, so it
migrates with RAM and a destination resumes it with :meth:`RxRingDriver.attach`:

* a ring (header + descriptors) at ``ring_gpa``, mapped BIDIRECTIONAL for the device;
* a pool of ``slots`` buffers from ``pool_gpa`` (``stride`` apart), half of them posted.

Ring header (64 bytes, big-endian)::

    "VFRXRING" | n u32 | tail u32 | ring_ioba u64 | pool_gpa u64 | slots u32 | stride u32
    | pool_next u64 | received u64 | corrupt u64

:meth:`probe` maps the ring and ``n = slots // 2`` buffers (FROM_DEVICE) with the TCE
hypercalls, posts them and returns the ring's IOBA and size for the device's registers.
:meth:`poll` reaps filled descriptors in ring order: it checks the payload that reached the
buffer's *guest* address (the cookie) against the sequence number the device wrote back --
a DMA that landed anywhere else counts as ``corrupt`` -- unmaps the buffer and maps the next
pool slot in its place, so TCE entries keep changing while the device runs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from vmferry.guest.dma import GuestDmaError, GuestDmaWindow
from vmferry.hw.memory import GuestMemory
from vmferry.hw.spapr.dmadev import (
    DESC_DONE,
    DESC_POSTED,
    MAX_RING,
    PAYLOAD_UNIT,
    Descriptor,
    desc_offset,
    payload,
    ring_bytes,
)
from vmferry.hw.spapr.tce import DmaDirection

RING_MAGIC: Final = b"VFRXRING"
_HEADER = struct.Struct(">8sIIQQIIQQQ")


@dataclass(frozen=True)
class DriverStats:
    ring_ioba: int
    tail: int
    pool_next: int
    received: int
    corrupt: int


@dataclass
class _Header:
    n: int
    tail: int
    ring_ioba: int
    pool_gpa: int
    slots: int
    stride: int
    pool_next: int
    received: int
    corrupt: int

    def pack(self) -> bytes:
        return _HEADER.pack(
            RING_MAGIC,
            self.n,
            self.tail,
            self.ring_ioba,
            self.pool_gpa,
            self.slots,
            self.stride,
            self.pool_next,
            self.received,
            self.corrupt,
        )


class RxRingDriver:
    def __init__(
        self,
        window: GuestDmaWindow,
        memory: GuestMemory,
        *,
        ring_gpa: int,
        pool_gpa: int,
        slots: int,
        buf_len: int,
        tag: int,
    ) -> None:
        if slots < 2 or slots % 2 or slots // 2 > MAX_RING:
            raise GuestDmaError(f"{slots} buffer slots: need an even number in [2, {MAX_RING * 2}]")
        if buf_len <= 0 or buf_len % PAYLOAD_UNIT:
            raise GuestDmaError(f"buffer length {buf_len} not a positive multiple of 16")
        self.window, self.memory = window, memory
        self.ring_gpa, self.pool_gpa = ring_gpa, pool_gpa
        self.slots, self.n, self.buf_len, self.tag = slots, slots // 2, buf_len, tag
        self.stride = -(-buf_len // 4096) * 4096
        self._hdr: _Header | None = None

    # --- bring-up ----------------------------------------------------------------------

    def probe(self) -> tuple[int, int]:
        """Map the ring and the first buffers; returns (ring IOBA, ring size)."""
        self.memory.write(self.ring_gpa, bytes(ring_bytes(self.n)))
        ring = self.window.map(self.ring_gpa, ring_bytes(self.n), DmaDirection.BIDIRECTIONAL)
        hdr = _Header(self.n, 0, ring.ioba, self.pool_gpa, self.slots, self.stride, 0, 0, 0)
        self._hdr = hdr
        for index in range(self.n):
            self._post(hdr, index)
        self._store(hdr)
        return ring.ioba, self.n

    def attach(self) -> None:
        """Resume from the state in guest memory (after a migration): rebuild the IOBA
        allocator from the ring; no hypercall, the TCE tables came with the VM."""
        magic, *fields = _HEADER.unpack(self.memory.read(self.ring_gpa, _HEADER.size))
        hdr = _Header(*fields)
        if magic != RING_MAGIC or (hdr.n, hdr.slots, hdr.stride) != (
            self.n,
            self.slots,
            self.stride,
        ):
            raise GuestDmaError(f"no ring of this driver at gpa {self.ring_gpa:#x}")
        self.window.adopt(hdr.ring_ioba, ring_bytes(hdr.n))
        for index in range(hdr.n):
            self.window.adopt(self._desc(index).ioba, self.buf_len)
        self._hdr = hdr

    # --- running -----------------------------------------------------------------------

    def poll(self) -> int:
        """Reap filled buffers and post fresh ones; returns how many were reaped."""
        hdr = self._need()
        reaped = 0
        while reaped < hdr.n:
            desc = self._desc(hdr.tail)
            if not desc.flags & DESC_DONE:
                break
            got = self.memory.read(desc.cookie, desc.length)
            hdr.corrupt += got != payload(self.tag, desc.seq, desc.length)
            hdr.received += 1
            mapping = self.window.mappings.get(desc.ioba)
            if mapping is None:
                raise GuestDmaError(f"descriptor {hdr.tail}: IOBA {desc.ioba:#x} not mapped")
            self.window.unmap(mapping)
            self._post(hdr, hdr.tail)
            hdr.tail = (hdr.tail + 1) % hdr.n
            reaped += 1
            self._store(hdr)
        return reaped

    def stats(self) -> DriverStats:
        hdr = self._need()
        return DriverStats(hdr.ring_ioba, hdr.tail, hdr.pool_next, hdr.received, hdr.corrupt)

    @property
    def attached(self) -> bool:
        return self._hdr is not None

    # --- guest memory ------------------------------------------------------------------

    def _need(self) -> _Header:
        if self._hdr is None:
            raise GuestDmaError("driver not probed or attached")
        return self._hdr

    def _post(self, hdr: _Header, index: int) -> None:
        gpa = hdr.pool_gpa + (hdr.pool_next % hdr.slots) * hdr.stride
        mapping = self.window.map(gpa, self.buf_len, DmaDirection.FROM_DEVICE)
        desc = Descriptor(mapping.ioba, gpa, self.buf_len, DESC_POSTED, 0)
        self.memory.write(self.ring_gpa + desc_offset(index), desc.pack())
        hdr.pool_next += 1

    def _desc(self, index: int) -> Descriptor:
        return Descriptor.unpack(self.memory.read(self.ring_gpa + desc_offset(index), 32))

    def _store(self, hdr: _Header) -> None:
        self.memory.write(self.ring_gpa, hdr.pack())
