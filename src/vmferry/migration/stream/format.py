"""Wire format of a vmferry migration stream, version 1.

The same bytes go over a migration connection and into a snapshot file.

::

    stream  := file-header record* END-record
    file-header (16 bytes)
    +--------------------------+-----------+-----------+-----------+
    | magic "VMFERRY\\0" (8)    | major u16 | minor u16 | flags u32 |
    +--------------------------+-----------+-----------+-----------+
    record (16 + length bytes)
    +-----------+-----------+------------+===================+--------------+
    | type u16  | flags u16 | length u32 | payload (length)  | checksum u64 |
    +-----------+-----------+------------+===================+--------------+

All integers are big-endian.  ``checksum`` is the running xxh3-64 of every byte of the
stream before it (file header, earlier records with their checksums, this record's
header and payload), so each record is verified before it is acted on and a dropped,
reordered or spliced record breaks every later checksum.  Record type 0 is reserved as
invalid; unknown types, lengths over the type's limit, a newer major version or a newer
minor version than the reader knows are decode errors.  Record flags are reserved (0).
"""

from __future__ import annotations

import enum
import struct

from vmferry.machine.handlers import DevicePhase as DevicePhase  # one definition

MAGIC = b"VMFERRY\x00"
MAJOR = 1
MINOR = 1  # 1: X86_VCPU and KVM_CLOCK records

FILE_HEADER = struct.Struct(">8sHHI")
RECORD_HEADER = struct.Struct(">HHI")
CHECKSUM = struct.Struct(">Q")
RECORD_OVERHEAD = RECORD_HEADER.size + CHECKSUM.size

MIB = 1024 * 1024


class RecordType(enum.IntEnum):
    INVALID = 0
    VM_CONFIG = 1  # JSON object: the VM definition and per-architecture extras
    RAM_PAGES = 2  # a run of raw pages
    RAM_ZERO = 3  # a run of pages that are all zero
    VCPU = 4  # one vCPU's registers
    DEVICE = 5  # one ordered chunk of one device's opaque state
    COMPONENT = 6  # one component's opaque saved state
    PASS_END = 7  # end of a RAM pass (statistics and inspection)
    END = 8  # end of stream
    RAM_SCATTER = 9  # scattered pages: a list of page numbers, then their data (or zero)
    X86_VCPU = 10  # one x86-64 vCPU's whole KVM state (layout: vmferry.hw.x86.state)
    KVM_CLOCK = 11  # the VM's KVM clock (layout: vmferry.hw.x86.state)


# Payload layouts (the fixed part; variable data follows).
RAM_PAGES = struct.Struct(">QII")  # gpa, npages, page_size
RAM_ZERO = struct.Struct(">QQI")  # gpa, npages, page_size
VCPU = struct.Struct(">II")  # index, count; then count x REG
REG = struct.Struct(">QQ")  # id, value
DEVICE = struct.Struct(">HBBI")  # id length, phase, reserved, sequence; then id, data
COMPONENT = struct.Struct(">H")  # name length; then name, data
PASS_END = struct.Struct(">IQ")  # pass number, pages sent in the pass
RAM_SCATTER = struct.Struct(">IIB3x")  # count, page_size, zero flag; then count x u64
#: page numbers (strictly increasing), then count x page_size bytes unless zero

#: Most pages one RAM_SCATTER record lists.
MAX_SCATTER_PAGES = 4096

#: Largest RAM_PAGES payload a writer produces and a reader accepts.
MAX_RAM_RUN_BYTES = 16 * MIB

#: Largest payload accepted per record type: checked before any payload byte is read.
MAX_PAYLOAD: dict[RecordType, int] = {
    RecordType.VM_CONFIG: 1 * MIB,
    RecordType.RAM_PAGES: RAM_PAGES.size + MAX_RAM_RUN_BYTES,
    RecordType.RAM_ZERO: RAM_ZERO.size,
    RecordType.VCPU: VCPU.size + 65536 * REG.size,
    RecordType.DEVICE: DEVICE.size + 255 + 16 * MIB,
    RecordType.COMPONENT: COMPONENT.size + 255 + 64 * MIB,
    RecordType.PASS_END: PASS_END.size,
    RecordType.END: 0,
    RecordType.RAM_SCATTER: RAM_SCATTER.size + MAX_SCATTER_PAGES * 8 + MAX_RAM_RUN_BYTES,
    RecordType.X86_VCPU: 2 * MIB,
    RecordType.KVM_CLOCK: 10 + 48,  # version 2 (version 1: 8 + 48; the payload checks it)
}

#: Payload lengths that are fixed rather than bounded.
EXACT_PAYLOAD: dict[RecordType, int] = {
    RecordType.RAM_ZERO: RAM_ZERO.size,
    RecordType.PASS_END: PASS_END.size,
    RecordType.END: 0,
}
