"""VFIO device state in the migration stream: opaque chunks, ordered per device.

The bytes a saving data fd yields are opaque; what the stream needs is to carry them per
device, in order, and to say up front which device type they belong to.  A record::

    0   magic 'VFDS' | version u8 | kind u8 | id_len u16
    8   seq u32 (per device, from 0, no gaps) | payload_len u32
    16  device id (utf-8, id_len bytes) | payload (payload_len bytes)

Kinds: CAPABILITY (payload: the source device's capability, see ``encode_capability``),
PRECOPY and STOP_COPY (payload: data-fd bytes), END (empty: the device's stream is
complete).  Decoding is strict: anything malformed is a StreamDecodeError subclass.
:class:`ChunkSequencer` enforces the per-device order on the destination.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from vmferry.errors import (
    BadMagic,
    MalformedRecord,
    TruncatedRecord,
    UnknownRecord,
    UnsupportedVersion,
)
from vmferry.hw.vfio.drivers.base import DeviceCapability
from vmferry.hw.vfio.states import MigrationFlags

MAGIC = b"VFDS"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")
CAP_HEADER = struct.Struct("<QQH")  # flags, data_size, number of compat items
CAP_ITEM = struct.Struct("<Hq")  # name length, value


class ChunkKind(IntEnum):
    CAPABILITY = 1
    PRECOPY = 2
    STOP_COPY = 3
    END = 4


@dataclass(frozen=True)
class DeviceStateChunk:
    device_id: str
    seq: int
    kind: ChunkKind
    payload: bytes = b""

    def __post_init__(self) -> None:
        if not self.device_id or not 0 <= self.seq < 1 << 32 or len(self.payload) >= 1 << 32:
            raise MalformedRecord(f"invalid device-state chunk {self.device_id!r}#{self.seq}")
        if self.kind is ChunkKind.END and self.payload:
            raise MalformedRecord("END chunk carries a payload")


def encode_chunk(chunk: DeviceStateChunk) -> bytes:
    ident = chunk.device_id.encode()
    head = HEADER.pack(MAGIC, VERSION, chunk.kind, len(ident), chunk.seq, len(chunk.payload))
    return head + ident + chunk.payload


def decode_chunk(data: bytes | memoryview) -> DeviceStateChunk:
    view = memoryview(data).cast("B")
    if len(view) < HEADER.size:
        raise TruncatedRecord(f"device-state chunk of {len(view)} bytes", 0)
    magic, version, kind, id_len, seq, length = HEADER.unpack_from(view)
    if magic != MAGIC:
        raise BadMagic(f"device-state chunk magic {bytes(magic)!r}", 0)
    if version != VERSION:
        raise UnsupportedVersion(f"device-state chunk version {version}", 4)
    if kind not in ChunkKind._value2member_map_:
        raise UnknownRecord(f"device-state chunk kind {kind}", 5)
    end = HEADER.size + id_len + length
    if len(view) != end:
        raise TruncatedRecord(f"device-state chunk: {len(view)} bytes, header says {end}",
                              len(view))  # fmt: skip
    try:
        ident = bytes(view[HEADER.size : HEADER.size + id_len]).decode()
    except UnicodeDecodeError as exc:
        raise MalformedRecord(f"device id is not utf-8: {exc}", HEADER.size) from None
    return DeviceStateChunk(ident, seq, ChunkKind(kind), bytes(view[HEADER.size + id_len :]))


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
    """Destination side: accept each device's chunks strictly in ``seq`` order."""

    def __init__(self) -> None:
        self.next_seq: dict[str, int] = {}
        self.ended: set[str] = set()

    def accept(self, chunk: DeviceStateChunk) -> None:
        want = self.next_seq.get(chunk.device_id, 0)
        if chunk.device_id in self.ended:
            raise MalformedRecord(f"{chunk.device_id}: chunk #{chunk.seq} after END")
        if chunk.seq != want:
            raise MalformedRecord(f"{chunk.device_id}: chunk #{chunk.seq}, expected #{want}")
        if (chunk.seq == 0) != (chunk.kind is ChunkKind.CAPABILITY):
            raise MalformedRecord(f"{chunk.device_id}: the first chunk must be CAPABILITY")
        self.next_seq[chunk.device_id] = want + 1
        if chunk.kind is ChunkKind.END:
            self.ended.add(chunk.device_id)
