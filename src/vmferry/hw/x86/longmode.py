"""Packing ``kvm_regs`` and ``kvm_sregs``, and the register state that enters 64-bit long
mode at CPL3 directly through ``KVM_SET_SREGS`` (no real-mode boot code)."""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from vmferry.errors import ConfigError

REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
_REGS = struct.Struct("<18Q")
_SEGMENT = struct.Struct("<QIHBBBBBBBBBx")
_DTABLE = struct.Struct("<QH6x")
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
CR0_LONG = 0x8005_0033  # PG | AM | WP | NE | ET | MP | PE
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 0x20, 0x200, 0x400
EFER_LME, EFER_LMA = 0x100, 0x400


def pack_regs(regs: Mapping[str, int]) -> bytes:
    unknown = set(regs) - set(REG_NAMES)
    if unknown:
        raise ConfigError(f"unknown registers {sorted(unknown)}")
    return _REGS.pack(*(regs.get(n, 0) for n in REG_NAMES))


def unpack_regs(data: bytes) -> dict[str, int]:
    return dict(zip(REG_NAMES, _REGS.unpack(data), strict=True))


@dataclass(frozen=True)
class Segment:
    base: int
    limit: int
    selector: int
    type: int
    present: int
    dpl: int
    db: int
    s: int
    l: int  # noqa: E741 -- the kernel's name
    g: int
    avl: int = 0
    unusable: int = 0

    def pack(self) -> bytes:
        return _SEGMENT.pack(self.base, self.limit, self.selector, self.type, self.present,
                             self.dpl, self.db, self.s, self.l, self.g, self.avl, self.unusable)

    @classmethod
    def unpack(cls, data: bytes, offset: int) -> Segment:
        return cls(*_SEGMENT.unpack_from(data, offset))


def sregs_field(data: bytes, name: str) -> int:
    """One control register of a packed ``kvm_sregs`` (cr0 cr2 cr3 cr4 cr8 efer apic_base)."""
    offsets = {"cr0": 224, "cr2": 232, "cr3": 240, "cr4": 248, "cr8": 256, "efer": 264,
               "apic_base": 272}
    return int(struct.unpack_from("<Q", data, offsets[name])[0])


def long_mode_sregs(current: bytes, *, gdt: int, gdt_limit: int, cr3: int,
                    code_sel: int, data_sel: int, tss_sel: int, tss: int) -> bytes:
    """``current`` (from KVM_GET_SREGS) changed to run 64-bit code at the privilege level
    of ``code_sel``'s RPL, with paging through ``cr3``."""
    out = bytearray(current)
    dpl = code_sel & 3
    code = Segment(0, 0xFFFFFFFF, code_sel, 11, 1, dpl, 0, 1, 1, 1)
    data = Segment(0, 0xFFFFFFFF, data_sel, 3, 1, dpl, 1, 1, 0, 1)
    segs = {
        "cs": code, "ds": data, "es": data, "fs": data, "gs": data, "ss": data,
        "tr": Segment(tss, 0x67, tss_sel, 11, 1, 0, 0, 0, 0, 0),
        "ldt": Segment(0, 0xFFFF, 0, 2, 0, 0, 0, 0, 0, 0, unusable=1),
    }
    for i, name in enumerate(SEGMENTS):
        out[i * 24 : (i + 1) * 24] = segs[name].pack()
    out[192:208] = _DTABLE.pack(gdt, gdt_limit)
    out[208:224] = _DTABLE.pack(0, 0)
    struct.pack_into("<QQQQQQ", out, 224, CR0_LONG, 0, cr3,
                     CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT, 0, EFER_LME | EFER_LMA)
    return bytes(out)
