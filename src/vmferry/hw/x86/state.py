"""The state of an x86-64 KVM vCPU and of the KVM clock, as carried in a migration stream.

Two record payloads, both versioned (a reader refuses a version it does not know):

``X86_VCPU`` -- one vCPU::

    +-------------+-----------+-------------------+
    | version u16 | index u16 | section count u32 |   then, per section:
    +-------------+-----------+-------------------+
    +--------+--------------+------------+=================+
    | id u16 | reserved u16 | length u32 | data (length)   |
    +--------+--------------+------------+=================+

  Header fields are big-endian like the rest of the stream; section *data* is the struct
  exactly as KVM hands it out on x86-64 (little-endian, the kernel's layout).  Sections,
  each exactly once, in any order:

  ====  ===========  =========================================================
  id    name         data
  ====  ===========  =========================================================
  1     REGS         ``kvm_regs``, 144 bytes
  2     SREGS        ``kvm_sregs``, 312 bytes
  3     FPU          ``kvm_fpu``, 416 bytes
  4     XSAVE        ``kvm_xsave``, a multiple of 4 bytes, at least 4096
  5     XCRS         ``kvm_xcrs``, 392 bytes
  6     EVENTS       ``kvm_vcpu_events``, 64 bytes
  7     MP_STATE     ``kvm_mp_state``, 4 bytes
  8     MSRS         u32 count, then count x (u32 index, u32 reserved 0, u64 value), LE
  9     CPUID        ``kvm_cpuid2``: u32 count, u32 pad, count x ``kvm_cpuid_entry2``
  ====  ===========  =========================================================

``KVM_CLOCK`` -- the VM's kvmclock: ``version u16, reserved u16, reserved u32``, then the
48-byte ``kvm_clock_data`` (LE) as ``KVM_GET_CLOCK`` returned it.

Version 1 is described here.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vmferry.errors import MalformedRecord
from vmferry.hw.x86 import kvm

VERSION = 1
_VCPU_HEAD = struct.Struct(">HHI")
_SECTION = struct.Struct(">HHI")
_CLOCK_HEAD = struct.Struct(">HHI")
_MSR = struct.Struct("<IIQ")


class Section(enum.IntEnum):
    REGS = 1
    SREGS = 2
    FPU = 3
    XSAVE = 4
    XCRS = 5
    EVENTS = 6
    MP_STATE = 7
    MSRS = 8
    CPUID = 9


FIXED = {
    Section.REGS: kvm.REGS_SIZE,
    Section.SREGS: kvm.SREGS_SIZE,
    Section.FPU: kvm.FPU_SIZE,
    Section.XCRS: kvm.XCRS_SIZE,
    Section.EVENTS: kvm.EVENTS_SIZE,
    Section.MP_STATE: kvm.MP_STATE_SIZE,
}
MAX_XSAVE = 1 << 20
MAX_MSRS = 4096
MAX_CPUID = 1024


@dataclass(frozen=True)
class X86VcpuState:
    """Everything KVM holds for one vCPU (raw KVM structs; see the module docstring)."""

    index: int
    regs: bytes
    sregs: bytes
    fpu: bytes
    xsave: bytes
    xcrs: bytes
    events: bytes
    mp_state: bytes
    msrs: tuple[tuple[int, int], ...]
    cpuid: bytes

    def encode(self) -> bytes:
        sections = [
            (Section.REGS, self.regs), (Section.SREGS, self.sregs), (Section.FPU, self.fpu),
            (Section.XSAVE, self.xsave), (Section.XCRS, self.xcrs),
            (Section.EVENTS, self.events), (Section.MP_STATE, self.mp_state),
            (Section.MSRS, struct.pack("<I", len(self.msrs))
             + b"".join(_MSR.pack(i, 0, v) for i, v in self.msrs)),
            (Section.CPUID, self.cpuid),
        ]
        out = bytearray(_VCPU_HEAD.pack(VERSION, self.index, len(sections)))
        for sid, data in sections:
            out += _SECTION.pack(sid, 0, len(data)) + data
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> X86VcpuState:
        data = bytes(payload)
        if len(data) < _VCPU_HEAD.size:
            raise MalformedRecord("X86_VCPU payload shorter than its header")
        version, index, count = _VCPU_HEAD.unpack_from(data)
        if version != VERSION:
            raise MalformedRecord(f"X86_VCPU version {version}; this reader knows {VERSION}")
        pos = _VCPU_HEAD.size
        found: dict[Section, bytes] = {}
        for _ in range(count):
            if pos + _SECTION.size > len(data):
                raise MalformedRecord(f"X86_VCPU {index}: section header past the end")
            sid, reserved, length = _SECTION.unpack_from(data, pos)
            pos += _SECTION.size
            try:
                section = Section(sid)
            except ValueError:
                raise MalformedRecord(f"X86_VCPU {index}: unknown section {sid}") from None
            if reserved or section in found or pos + length > len(data):
                raise MalformedRecord(f"X86_VCPU {index}: section {section.name} is "
                                      "repeated, truncated or has reserved bits set")
            found[section] = data[pos : pos + length]
            pos += length
        if pos != len(data):
            raise MalformedRecord(f"X86_VCPU {index}: {len(data) - pos} bytes after the sections")
        missing = [s.name for s in Section if s not in found]
        if missing:
            raise MalformedRecord(f"X86_VCPU {index}: sections {missing} missing")
        for section, size in FIXED.items():
            if len(found[section]) != size:
                raise MalformedRecord(f"X86_VCPU {index}: {section.name} is "
                                      f"{len(found[section])} bytes, not {size}")
        xsave = found[Section.XSAVE]
        if len(xsave) % 4 or not kvm.XSAVE_SIZE <= len(xsave) <= MAX_XSAVE:
            raise MalformedRecord(f"X86_VCPU {index}: XSAVE area of {len(xsave)} bytes")
        return cls(index, found[Section.REGS], found[Section.SREGS], found[Section.FPU], xsave,
                   found[Section.XCRS], found[Section.EVENTS], found[Section.MP_STATE],
                   _msrs(found[Section.MSRS], index), _cpuid(found[Section.CPUID], index))

    def summary(self) -> dict[str, object]:
        """A short description for ``stream inspect``."""
        rip, rflags = struct.unpack_from("<QQ", self.regs, 128)
        return {"vcpu": self.index, "rip": f"{rip:#x}", "rflags": f"{rflags:#x}",
                "msrs": len(self.msrs), "xsave_bytes": len(self.xsave),
                "cpuid_entries": struct.unpack_from("<I", self.cpuid)[0]}


def _msrs(data: bytes, index: int) -> tuple[tuple[int, int], ...]:
    if len(data) < 4:
        raise MalformedRecord(f"X86_VCPU {index}: MSRS shorter than its count")
    (n,) = struct.unpack_from("<I", data)
    if n > MAX_MSRS or len(data) != 4 + n * _MSR.size:
        raise MalformedRecord(f"X86_VCPU {index}: MSRS says {n} entries, length disagrees")
    out = []
    for k in range(n):
        msr, reserved, value = _MSR.unpack_from(data, 4 + k * _MSR.size)
        if reserved:
            raise MalformedRecord(f"X86_VCPU {index}: MSR {msr:#x} has reserved bits set")
        out.append((msr, value))
    if len({m for m, _ in out}) != n:
        raise MalformedRecord(f"X86_VCPU {index}: an MSR appears twice")
    return tuple(out)


def _cpuid(data: bytes, index: int) -> bytes:
    if len(data) < 8:
        raise MalformedRecord(f"X86_VCPU {index}: CPUID shorter than its header")
    (n,) = struct.unpack_from("<I", data)
    if n > MAX_CPUID or len(data) != 8 + n * kvm.CPUID_ENTRY_SIZE:
        raise MalformedRecord(f"X86_VCPU {index}: CPUID says {n} entries, length disagrees")
    return data


@dataclass(frozen=True)
class KvmClockState:
    """The VM's kvmclock (``kvm_clock_data`` as KVM_GET_CLOCK returned it)."""

    data: bytes

    @property
    def clock_ns(self) -> int:
        return int(struct.unpack_from("<Q", self.data)[0])

    def encode(self) -> bytes:
        return _CLOCK_HEAD.pack(VERSION, 0, 0) + self.data

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> KvmClockState:
        data = bytes(payload)
        if len(data) != _CLOCK_HEAD.size + kvm.CLOCK_SIZE:
            raise MalformedRecord(f"KVM_CLOCK payload of {len(data)} bytes")
        version, r1, r2 = _CLOCK_HEAD.unpack_from(data)
        if version != VERSION or r1 or r2:
            raise MalformedRecord(f"KVM_CLOCK version {version} or reserved bits unknown")
        return cls(data[_CLOCK_HEAD.size :])
