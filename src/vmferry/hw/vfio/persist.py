"""VFIO device state in the migration stream: capabilities and per-device ordering.

The bytes a saving data fd yields are opaque; the stream carries them as DEVICE chunks
(``vmferry.migration.stream``: device id, phase PRE_COPY / STOP_COPY / DONE, sequence
number).  What this module adds:

* ``encode_capability`` / ``decode_capability``: the source device's
  :class:`DeviceCapability`, so a destination can refuse a type it cannot host before
  any downtime (strict decoding: malformed bytes are a StreamDecodeError subclass)::

      0   flags u64 | data_size u64 | n u16
      18  (n + 1) items: name length u16 | value i64 | name (utf-8)
          item 0 is the driver name (value 0); items 1..n the compat pairs

* :class:`ChunkSequencer`: the destination's check that each device's chunks arrive in
  order (sequence numbers from 0, no gaps, nothing after DONE) -- the uAPI requires the
  resuming fd to see the saving fd's bytes in the same order.
"""

from __future__ import annotations

import struct

from vmferry.errors import MalformedRecord
from vmferry.hw.vfio.drivers.base import DeviceCapability
from vmferry.hw.vfio.states import MigrationFlags

CAP_HEADER = struct.Struct("<QQH")  # flags, data_size, number of compat items
CAP_ITEM = struct.Struct("<Hq")  # name length, value


def encode_capability(cap: DeviceCapability) -> bytes:
    out = bytearray(CAP_HEADER.pack(int(cap.flags), cap.data_size, len(cap.compat)))
    for name, value in ((cap.driver, 0), *cap.compat):
        raw = name.encode()
        out += CAP_ITEM.pack(len(raw), value) + raw
    return bytes(out)


def decode_capability(data: bytes) -> DeviceCapability:
    try:
        flags, size, count = CAP_HEADER.unpack_from(data, 0)
        at = CAP_HEADER.size
        items: list[tuple[str, int]] = []
        for _ in range(count + 1):
            n, value = CAP_ITEM.unpack_from(data, at)
            at += CAP_ITEM.size
            if at + n > len(data):
                raise MalformedRecord("capability item runs past the payload", at)
            items.append((data[at : at + n].decode(), value))
            at += n
    except (struct.error, UnicodeDecodeError) as exc:
        raise MalformedRecord(f"capability payload: {exc}") from None
    if at != len(data) or flags & ~0x7:
        raise MalformedRecord("capability payload has trailing bytes or bad flags", at)
    (driver, _), *compat = items
    return DeviceCapability(driver, MigrationFlags(flags), size, tuple(compat))


class ChunkSequencer:
    """Destination side: accept each device's chunks strictly in sequence order."""

    def __init__(self) -> None:
        self.next_seq: dict[str, int] = {}
        self.done: set[str] = set()

    def accept(self, device: str, seq: int, *, last: bool = False) -> None:
        """Admit chunk ``seq`` of ``device`` (``last``: the DONE chunk) or raise."""
        if device in self.done:
            raise MalformedRecord(f"{device}: chunk #{seq} after its DONE chunk")
        want = self.next_seq.get(device, 0)
        if seq != want:
            raise MalformedRecord(f"{device}: chunk #{seq}, expected #{want}")
        self.next_seq[device] = want + 1
        if last:
            self.done.add(device)
