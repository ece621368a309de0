"""The state of an x86-64 KVM vCPU and of the KVM clock, as carried in a migration stream.

Both are plain state types on the persist contract (:mod:`vmferry.hw.persist`):
``machine.x86`` saves them from KVM (cannot fail) and restores them into KVM (can), and
their bytes are declared once as a :class:`~vmferry.hw.persist.Layout`.

``X86_VCPU`` -- one vCPU, version 2::

    +-------------+-------------+-----------+------------------------------+
    | magic 'XVCP'| version u16 | index u16 | 9 x u32 length, in this order |
    +-------------+-------------+-----------+------------------------------+
    then the nine fields' bytes, in the same order:

  ===========  =========================================================
  field        data
  ===========  =========================================================
  regs         ``kvm_regs``, 144 bytes
  sregs        ``kvm_sregs``, 312 bytes
  fpu          ``kvm_fpu``, 416 bytes
  xsave        ``kvm_xsave``, a multiple of 4 bytes, at least 4096
  xcrs         ``kvm_xcrs``, 392 bytes
  events       ``kvm_vcpu_events``, 64 bytes
  mp_state     ``kvm_mp_state``, 4 bytes
  msrs         u32 count, then count x (u32 index, u32 reserved 0, u64 value), LE
  cpuid        ``kvm_cpuid2``: u32 count, u32 pad, count x ``kvm_cpuid_entry2``
  ===========  =========================================================

  Header fields are big-endian like the rest of the stream; the field *data* is the
  struct exactly as KVM hands it out on x86-64 (little-endian, the kernel's layout).

``KVM_CLOCK`` -- the VM's kvmclock, version 2: ``magic 'KCLK', version u16, u32 length``,
then the 48-byte ``kvm_clock_data`` (LE) as ``KVM_GET_CLOCK`` returned it.

Version 1 (written by releases before the persist layout, still read): no magic.
``X86_VCPU`` was ``version u16 (1) | index u16 | section count u32`` then, per section,
``id u16 | reserved u16 | length u32 | data`` with ids 1..9 for the fields above in the
table's order, each exactly once, in any order; ``KVM_CLOCK`` was ``version u16 (1),
reserved u16, reserved u32`` then the 48 bytes.  A payload that starts with a magic is
read as its layout says; one that starts with the u16 1 as version 1.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from vmferry.errors import MalformedRecord
from vmferry.hw import persist
from vmferry.hw.persist import Field, Layout
from vmferry.hw.x86 import kvm

VERSION = 2
LEGACY_VERSION = 1
_FIELDS = ("regs", "sregs", "fpu", "xsave", "xcrs", "events", "mp_state", "msrs", "cpuid")
VCPU_LAYOUT = Layout("x86 vcpu", b"XVCP", VERSION,
                     (Field("index", "u16"), *(Field(f, "bytes32") for f in _FIELDS)))
CLOCK_LAYOUT = Layout("kvm clock", b"KCLK", VERSION, (Field("data", "bytes32"),))
_LEGACY_HEAD = struct.Struct(">HHI")
_SECTION = struct.Struct(">HHI")
_MSR = struct.Struct("<IIQ")


class Section(enum.IntEnum):
    """The section ids of a version-1 ``X86_VCPU`` (read, and written for a destination
    that reads nothing newer)."""

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
    "regs": kvm.REGS_SIZE,
    "sregs": kvm.SREGS_SIZE,
    "fpu": kvm.FPU_SIZE,
    "xcrs": kvm.XCRS_SIZE,
    "events": kvm.EVENTS_SIZE,
    "mp_state": kvm.MP_STATE_SIZE,
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

    def encode(self, version: int = VERSION) -> bytes:
        """The payload in ``version`` (2, or 1 for a destination of the release before
        the layout: :func:`write_version`); cannot fail for a state of the declared types."""
        msrs = struct.pack("<I", len(self.msrs)) + b"".join(
            _MSR.pack(i, 0, v) for i, v in self.msrs)
        values: dict[str, object] = {f: getattr(self, f) for f in _FIELDS}
        values.update(index=self.index, msrs=msrs)
        if version == LEGACY_VERSION:
            out = bytearray(_LEGACY_HEAD.pack(LEGACY_VERSION, self.index, len(Section)))
            for sec in Section:
                data = values[sec.name.lower()]
                assert isinstance(data, bytes)
                out += _SECTION.pack(sec, 0, len(data)) + data
            return bytes(out)
        _check_writable(version)
        return VCPU_LAYOUT.encode(values)

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> X86VcpuState:
        """Read a version-2 or version-1 payload.  Raises a StreamDecodeError (BadMagic,
        UnsupportedVersion, TruncatedRecord, MalformedRecord) naming what is wrong."""
        data = bytes(payload)
        if data[:2] == LEGACY_VERSION.to_bytes(2, "big"):
            index, found = _legacy_sections(data)
        else:
            values = VCPU_LAYOUT.decode(data)
            index, found = values["index"], {f: values[f] for f in _FIELDS}
        return cls._checked(index, found)

    @classmethod
    def _checked(cls, index: int, found: dict[str, bytes]) -> X86VcpuState:
        for name, size in FIXED.items():
            if len(found[name]) != size:
                raise MalformedRecord(f"X86_VCPU {index}: {name.upper()} is "
                                      f"{len(found[name])} bytes, not {size}")
        xsave = found["xsave"]
        if len(xsave) % 4 or not kvm.XSAVE_SIZE <= len(xsave) <= MAX_XSAVE:
            raise MalformedRecord(f"X86_VCPU {index}: XSAVE area of {len(xsave)} bytes")
        return cls(index, found["regs"], found["sregs"], found["fpu"], xsave, found["xcrs"],
                   found["events"], found["mp_state"], _msrs(found["msrs"], index),
                   _cpuid(found["cpuid"], index))

    def summary(self) -> dict[str, object]:
        """A short description for ``stream inspect``."""
        rip, rflags = struct.unpack_from("<QQ", self.regs, 128)
        return {"vcpu": self.index, "rip": f"{rip:#x}", "rflags": f"{rflags:#x}",
                "msrs": len(self.msrs), "xsave_bytes": len(self.xsave),
                "cpuid_entries": struct.unpack_from("<I", self.cpuid)[0]}


def _legacy_sections(data: bytes) -> tuple[int, dict[str, bytes]]:
    """The sections of a version-1 payload, by field name."""
    if len(data) < _LEGACY_HEAD.size:
        raise MalformedRecord("X86_VCPU payload shorter than its header")
    _, index, count = _LEGACY_HEAD.unpack_from(data)
    pos = _LEGACY_HEAD.size
    found: dict[str, bytes] = {}
    for _ in range(count):
        if pos + _SECTION.size > len(data):
            raise MalformedRecord(f"X86_VCPU {index}: section header past the end")
        sid, reserved, length = _SECTION.unpack_from(data, pos)
        pos += _SECTION.size
        try:
            name = Section(sid).name.lower()
        except ValueError:
            raise MalformedRecord(f"X86_VCPU {index}: unknown section {sid}") from None
        if reserved or name in found or pos + length > len(data):
            raise MalformedRecord(f"X86_VCPU {index}: section {name.upper()} is "
                                  "repeated, truncated or has reserved bits set")
        found[name] = data[pos : pos + length]
        pos += length
    if pos != len(data):
        raise MalformedRecord(f"X86_VCPU {index}: {len(data) - pos} bytes after the sections")
    missing = [f.upper() for f in _FIELDS if f not in found]
    if missing:
        raise MalformedRecord(f"X86_VCPU {index}: sections {missing} missing")
    return index, found


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

    def encode(self, version: int = VERSION) -> bytes:
        """The payload in ``version`` (2, or 1: see :meth:`X86VcpuState.encode`)."""
        if version == LEGACY_VERSION:
            return _LEGACY_HEAD.pack(LEGACY_VERSION, 0, 0) + self.data
        _check_writable(version)
        return CLOCK_LAYOUT.encode({"data": self.data})

    @classmethod
    def decode(cls, payload: bytes | bytearray | memoryview) -> KvmClockState:
        """Read a version-2 or version-1 payload; a StreamDecodeError otherwise."""
        data = bytes(payload)
        if data[:2] == LEGACY_VERSION.to_bytes(2, "big"):
            if len(data) != _LEGACY_HEAD.size + kvm.CLOCK_SIZE:
                raise MalformedRecord(f"KVM_CLOCK payload of {len(data)} bytes")
            _, r1, r2 = _LEGACY_HEAD.unpack_from(data)
            if r1 or r2:
                raise MalformedRecord("KVM_CLOCK version 1 with reserved bits set")
            clock = data[_LEGACY_HEAD.size :]
        else:
            clock = CLOCK_LAYOUT.decode(data)["data"]
        if len(clock) != kvm.CLOCK_SIZE:
            raise MalformedRecord(f"KVM_CLOCK data of {len(clock)} bytes, not {kvm.CLOCK_SIZE}")
        return cls(clock)


def write_version(readable: object) -> int:
    """The payload version to write for a reader that announced ``readable`` as the
    highest it reads (None: a host of the release before the layout, which announces
    nothing and reads version 1 only)."""
    return persist.write_version("x86", VERSION, readable)


def _check_writable(version: int) -> None:
    if version != VERSION:
        raise ValueError(f"x86 state version {version} cannot be written (1 or {VERSION})")
