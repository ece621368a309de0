"""The QEMU migration stream format (QEMU 7.2), as constants and one cursor.

Layout (all integers big-endian unless a field's type says otherwise)::

    +------+------------+
    | QEVM | version 3  |                           file header, 8 bytes
    +------+------------+
    | 0x07 | u32 len | machine name | subsections  configuration (no footer)
    | 0x01 START / 0x04 FULL | u32 section_id | u8 len | idstr | u32 instance | u32 version
    |        section data ...  | 0x7e | u32 section_id               (footer)
    | 0x02 PART / 0x03 END   | u32 section_id | data | 0x7e | u32 section_id
    | 0x08 COMMAND | u16 cmd | u16 len | data
    | 0x00 EOF
    | 0x06 | u32 len | JSON VM description        (what every FULL section holds)

A subsection inside device data is ``0x05 | u8 len | name | u32 version | fields``.

RAM section data is a sequence of records, each opened by a u64 whose low bits (below the
target page size) are ``RAM_SAVE_FLAG_*`` and whose high bits are a page offset in the
block (or, with ``MEM_SIZE``, the total RAM size).
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag
from typing import Final

from vmferry.errors import StreamDecodeError, TruncatedRecord

QEMU_VM_FILE_MAGIC: Final = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION: Final = 3
QEMU_VM_FILE_VERSION_COMPAT: Final = 2
SECTION_FOOTER: Final = 0x7E
SUBSECTION: Final = 0x05
#: target page size when the configuration does not say (x86, ppc64, arm64 4 KiB)
DEFAULT_PAGE_SIZE: Final = 4096
#: bytes of one hashed page table entry (HASH_PTE_SIZE_64)
HPTE_SIZE: Final = 16


class SectionType(IntEnum):
    """``QEMU_VM_*`` section type bytes (migration/savevm.c)."""

    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08


class RamFlag(IntFlag):
    """``RAM_SAVE_FLAG_*`` (migration/ram.c, QEMU 7.2)."""

    FULL = 0x01  # obsolete, never sent
    ZERO = 0x02
    MEM_SIZE = 0x04
    PAGE = 0x08
    EOS = 0x10
    CONTINUE = 0x20
    XBZRLE = 0x40
    HOOK = 0x80  # RDMA only
    COMPRESS_PAGE = 0x100


ENCODING_FLAG_XBZRLE: Final = 0x1

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class Cursor:
    """Reads a bytes-like buffer front to back; every read checks the bound first.

    No read allocates more than the bytes it returns, and those bytes exist in the buffer,
    so a hostile length can cost at most the size of the input.
    """

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: memoryview, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    @property
    def left(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.end:
            raise TruncatedRecord(
                f"QEMU stream truncated: expected {what} ({n} bytes), "
                f"{max(self.end - self.pos, 0)} left", self.pos)

    def u8(self, what: str) -> int:
        self.need(1, what)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def peek8(self) -> int | None:
        return self.buf[self.pos] if self.pos < self.end else None

    def be16(self, what: str) -> int:
        self.need(2, what)
        (v,) = U16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return int(v)

    def be32(self, what: str) -> int:
        self.need(4, what)
        (v,) = U32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return int(v)

    def be64(self, what: str) -> int:
        self.need(8, what)
        (v,) = U64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return int(v)

    def take(self, n: int, what: str) -> memoryview:
        self.need(n, what)
        v = self.buf[self.pos:self.pos + n]
        self.pos += n
        return v

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n

    def idstr(self, what: str) -> str:
        """``u8 len | bytes``: a section, block or subsection name."""
        start = self.pos
        n = self.u8(f"{what} length")
        raw = bytes(self.take(n, what))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise StreamDecodeError(
                f"QEMU stream: expected an ASCII {what}, found {raw[:32]!r}", start) from None
