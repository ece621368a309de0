"""The RTAS work area: one 4 KiB big-endian buffer per call, its layout declared once.

Firmware (:mod:`vmferry.hw.spapr.rtas`) writes these work areas and the guest
(:mod:`vmferry.guest.mobility`) parses them; both read every offset from the tables here,
so the two sides cannot drift apart.

::

    ibm,update-nodes        ibm,update-properties       ibm,configure-connector
    +0  sequence state      +0  phandle                 +0  drc index
    +4  reserved (12)       +4  sequence state          +8  name offset
    +16 op lists ...        +8  reserved (8)            +12 value length
                            +16 descriptor count        +16 value offset
                            +20 descriptors ...         +20 name/value data ...
"""

from __future__ import annotations

import enum

from vmferry.errors import ModelError

WORK_AREA_SIZE = 4096  # RTAS_DATA_BUF_SIZE; LoPAR: 4 KB
UPDATE_NODES_HEADER = 16
UPDATE_PROPS_HEADER = 20
CC_DATA_OFFSET = 20
MIGRATION_SCOPE = 1
PRRN_SCOPE = -2
NODE_ACTION_MASK = 0xFF000000
NODE_COUNT_MASK = 0x00FFFFFF
VD_DELETE = 0x80000000


class UpdateNodesField(enum.IntEnum):
    """Word offsets of the ``ibm,update-nodes`` header."""

    STATE = 0  # 0 on the first call; echoed unchanged while status is MORE


class UpdatePropsField(enum.IntEnum):
    """Word offsets of the ``ibm,update-properties`` header."""

    PHANDLE = 0
    STATE = 4  # 0 on the first call for a node; echoed while status is MORE
    COUNT = 16  # descriptors in this page


#: bytes of the update-properties header the caller echoes unchanged (phandle .. reserved)
UPDATE_PROPS_ECHO = 16


class CcField(enum.IntEnum):
    """Word offsets of the ``ibm,configure-connector`` work area."""

    DRC_INDEX = 0
    NAME_OFFSET = 8
    VALUE_LENGTH = 12
    VALUE_OFFSET = 16


class Rc(enum.IntEnum):
    """Generic RTAS status values (``asm/rtas.h``)."""

    SUCCESS = 0
    MORE = 1  # update-nodes / update-properties: call again
    HW_ERROR = -1
    BUSY = -2
    PARAM_ERROR = -3
    NOT_SUPPORTED = -5
    UNEXPECTED_STATE = -7
    DELAY_1MS = 9900
    DELAY_10MS = 9901
    DELAY_100MS = 9902
    DELAY_1S = 9903
    DELAY_10S = 9904
    DELAY_100S = 9905


class Cc(enum.IntEnum):
    """``ibm,configure-connector`` status values (LoPAR; kernel ``dlpar.c`` names)."""

    COMPLETE = 0
    NEXT_SIBLING = 1
    NEXT_CHILD = 2
    NEXT_PROPERTY = 3
    PREV_PARENT = 4
    MORE_MEMORY = 5
    HW_ERROR = -1
    CALL_AGAIN = -2
    NOT_SUPPORTED_IN_SYSTEM = -9001
    NOT_SUPPORTED_IN_CONNECTOR = -9002
    ERR_CFG_USE = -9003


class NodeOp(enum.IntEnum):
    """update-nodes opcodes (high byte of the operator word)."""

    TERMINATOR = 0x00
    DELETE = 0x01
    UPDATE = 0x02
    ADD = 0x03


def is_extended_delay(rc: int) -> bool:
    return 9900 <= rc <= 9905


def extended_delay_s(rc: int) -> float:
    """9900 -> 1 ms ... 9905 -> 100 s (``rtas_busy_delay_time``)."""
    return float(10 ** (rc - 9900)) / 1000.0


class WorkAreaError(ModelError):
    """A work area is malformed (remote: firmware sent something illegal)."""

    def __init__(self, message: str, offset: int | None = None) -> None:
        self.offset = offset
        super().__init__(message if offset is None else f"{message} (offset {offset:#x})")


class WorkAreaOverrun(WorkAreaError):
    """Parsing would read beyond the 4096-byte work area."""


class TruncatedWorkArea(WorkAreaError):
    """The buffer handed over is not a full 4096-byte work area."""


class WorkArea:
    """A 4096-byte big-endian work area with bounds-checked readers."""

    __slots__ = ("buf",)

    def __init__(self, buf: bytearray | None = None) -> None:
        if buf is None:
            buf = bytearray(WORK_AREA_SIZE)
        if len(buf) != WORK_AREA_SIZE:
            raise TruncatedWorkArea(f"work area is {len(buf)} bytes, not {WORK_AREA_SIZE}")
        self.buf = buf

    def _need(self, off: int, n: int) -> None:
        if off < 0 or off + n > WORK_AREA_SIZE:
            raise WorkAreaOverrun(f"read of {n} bytes crosses the work area end", off)

    def u32(self, off: int) -> int:
        self._need(off, 4)
        return int.from_bytes(self.buf[off:off + 4], "big")

    def set_u32(self, off: int, value: int) -> None:
        self._need(off, 4)
        self.buf[off:off + 4] = (value & 0xFFFFFFFF).to_bytes(4, "big")

    def cstr(self, off: int) -> str:
        self._need(off, 1)
        end = self.buf.find(b"\0", off)
        if end < 0:
            raise WorkAreaOverrun("unterminated string", off)
        return self.buf[off:end].decode("latin-1")

def read_extended(wa: bytearray, extents: list[bytearray], off: int, n: int) -> bytes:
    """Read ``n`` bytes at ``off`` of the work area followed by its extent pages."""
    whole = bytes(wa) + b"".join(bytes(e) for e in extents)
    if off < 0 or off + n > len(whole):
        raise WorkAreaOverrun(f"configure-connector data crosses {len(whole)} bytes", off)
    return whole[off:off + n]
