"""Issue 11 item 4: the X86_VCPU and KVM_CLOCK payloads, without KVM (layout, versions,
hostile input), and item 5's platform keys; issue 14 item 5: both on the persist layout,
and the version-1 payloads of the previous release still load (tests/fixtures/x86)."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmferry.errors import (
    BadMagic,
    ConfigError,
    MalformedRecord,
    StreamDecodeError,
    UnsupportedVersion,
)
from vmferry.hw.x86 import kvm
from vmferry.hw.x86.longmode import long_mode_sregs, pack_regs, sregs_field, unpack_regs
from vmferry.hw.x86.state import (
    CLOCK_LAYOUT,
    VCPU_LAYOUT,
    KvmClockState,
    X86VcpuState,
    write_version,
)
from vmferry.machine.x86 import KvmPlatform, parse_cpuid_bit
from vmferry.migration.stream import StreamDecoder, StreamEncoder, X86VcpuRecord


def state(index: int = 0, msrs: tuple[tuple[int, int], ...] = ((0x10, 5),)) -> X86VcpuState:
    cpuid = kvm.pack_cpuid([kvm.CpuidEntry(1, 0, 0, 1, 2, 3, 4)])
    return X86VcpuState(index, bytes(144), bytes(312), bytes(416), bytes(4096), bytes(392),
                        bytes(64), bytes(4), msrs, cpuid)


@given(st.integers(0, 65535),
       st.dictionaries(st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), max_size=50))
def test_item4_vcpu_state_round_trips(index: int, msrs: dict[int, int]) -> None:
    s = state(index, tuple(msrs.items()))
    assert X86VcpuState.decode(s.encode()) == s


def test_item4_vcpu_record_goes_through_the_stream() -> None:
    enc, dec = StreamEncoder(), StreamDecoder()
    dec.feed(enc.header())
    for b in enc.encode(X86VcpuRecord(state(3).encode())):
        dec.feed(b)
    (rec,) = list(dec.events())
    assert isinstance(rec, X86VcpuRecord) and rec.state.index == 3


FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "x86"


@given(st.binary(max_size=200))
def test_item4_garbage_is_a_typed_decode_error(data: bytes) -> None:
    with pytest.raises(StreamDecodeError):
        X86VcpuState.decode(data)
    with pytest.raises(StreamDecodeError):
        KvmClockState.decode(data)


@pytest.mark.parametrize("cut", [1, 8, 100, 5000])
def test_item4_truncated_or_padded_state_is_refused(cut: int) -> None:
    good = state().encode()
    with pytest.raises(MalformedRecord):
        X86VcpuState.decode(good[:-cut])
    with pytest.raises(MalformedRecord):
        X86VcpuState.decode(good + b"\0" * cut)


def test_item4_missing_or_repeated_section_is_refused() -> None:
    """Version 1 (the release's section table) is still read, and still checked."""
    good = bytearray((FIXTURES / "vcpu-v1.bin").read_bytes())
    short = bytearray(good)
    struct.pack_into(">I", short, 4, 8)  # claims one section fewer
    with pytest.raises(MalformedRecord):
        X86VcpuState.decode(bytes(short))
    (length,) = struct.unpack_from(">I", good, 12)
    regs = bytes(good[8 : 8 + 8 + length])
    twice = bytearray(good) + regs
    struct.pack_into(">I", twice, 4, 10)
    with pytest.raises(MalformedRecord, match="repeated"):
        X86VcpuState.decode(bytes(twice))


def test_item4_clock_layout() -> None:
    c = KvmClockState(struct.pack("<Q40x", 123456789))
    assert KvmClockState.decode(c.encode()).clock_ns == 123456789
    with pytest.raises(MalformedRecord):
        KvmClockState.decode(struct.pack(">HHI", 1, 0, 1) + bytes(48))  # v1, reserved set
    with pytest.raises(MalformedRecord):
        KvmClockState.decode(CLOCK_LAYOUT.encode({"data": bytes(47)}))


def test_issue14_5_previous_release_payloads_still_load() -> None:
    expected = json.loads((FIXTURES / "expected.json").read_text())
    vcpu = X86VcpuState.decode((FIXTURES / "vcpu-v1.bin").read_bytes())
    want = expected["vcpu"]
    assert vcpu.index == want["index"] and [list(m) for m in vcpu.msrs] == want["msrs"]
    for name in ("regs", "sregs", "fpu", "xsave", "xcrs", "events", "mp_state", "cpuid"):
        assert hashlib.sha256(getattr(vcpu, name)).hexdigest() == want[name], name
    clock = KvmClockState.decode((FIXTURES / "clock-v1.bin").read_bytes())
    assert clock.clock_ns == expected["clock"]["clock_ns"]
    assert hashlib.sha256(clock.data).hexdigest() == expected["clock"]["data"]
    # saved again, they are version 2 and read back the same
    assert X86VcpuState.decode(vcpu.encode()) == vcpu
    assert vcpu.encode()[:6] == b"XVCP\0\2" and clock.encode()[:6] == b"KCLK\0\2"
    assert KvmClockState.decode(clock.encode()) == clock


def test_issue14_5_an_earlier_destination_gets_the_previous_release_bytes() -> None:
    """A destination of the release before the layout reads version 1 only: written in
    version 1, the payloads are byte for byte what that release wrote."""
    for name, cls in (("vcpu-v1.bin", X86VcpuState), ("clock-v1.bin", KvmClockState)):
        old = (FIXTURES / name).read_bytes()
        assert cls.decode(old).encode(1) == old, name
    s = state(7, ((0x10, 5), (0xC0000080, 0x500)))
    assert X86VcpuState.decode(s.encode(1)) == s


def test_issue14_5_write_version_follows_what_the_destination_reads() -> None:
    assert write_version(None) == 1  # an earlier release announces nothing
    assert write_version(1) == 1 and write_version(2) == 2
    assert write_version(9) == 2  # a later reader reads ours
    for bad in (0, -1, "2", True, 1.5):
        with pytest.raises(MalformedRecord, match="announced by the destination"):
            write_version(bad)
    with pytest.raises(ValueError, match="cannot be written"):
        state().encode(3)


def test_issue14_5_version_and_magic_are_checked() -> None:
    good = bytearray(state(2).encode())
    future = bytearray(good)
    struct.pack_into(">H", future, 4, 3)
    with pytest.raises(UnsupportedVersion):
        X86VcpuState.decode(bytes(future))
    wrong = b"QVCP" + bytes(good[4:])
    with pytest.raises(BadMagic):
        X86VcpuState.decode(wrong)
    fields = VCPU_LAYOUT.decode(bytes(good))
    fields.pop("version")
    fields["regs"] = bytes(143)
    with pytest.raises(MalformedRecord, match="REGS is 143 bytes"):
        X86VcpuState.decode(VCPU_LAYOUT.encode(fields))


def test_item1_long_mode_registers() -> None:
    sregs = long_mode_sregs(bytes(312), gdt=0x1000, gdt_limit=55, cr3=0x2000, code_sel=0x1B,
                            data_sel=0x23, tss_sel=0x28, tss=0x1800)
    assert sregs_field(sregs, "cr3") == 0x2000 and sregs_field(sregs, "efer") == 0x500
    assert sregs_field(sregs, "cr0") == 0x80050033
    cs = struct.unpack_from("<QIHBBBBBBBBB", sregs, 0)
    assert cs[2] == 0x1B and cs[5] == 3 and cs[8] == 1  # selector, DPL 3, L
    regs = {"rip": 0xA000, "r15": 7, "rflags": 2}
    assert {k: v for k, v in unpack_regs(pack_regs(regs)).items() if v} == regs
    with pytest.raises(ConfigError):
        pack_regs({"eax": 1})


def test_item5_platform_keys() -> None:
    p = KvmPlatform.parse({"kvm": {"hide_msrs": [0x10], "refuse_msrs": [0x277],
                                   "hide_cpuid": ["7:ebx:5", "0xd.1:eax:0"]}})
    assert p.hide_msrs == {0x10} and p.refuse_msrs == {0x277}
    assert p.hide_cpuid == {(7, 0, "ebx", 5), (0xD, 1, "eax", 0)}
    for bad in ({"kvm": {"hide_msrs": ["x"]}}, {"kvm": {"nope": 1}}, {"kvm": 3},
                {"kvm": {"hide_cpuid": ["7:exx:1"]}}, {"kvm": {"hide_cpuid": ["7:ebx:32"]}}):
        with pytest.raises(ConfigError):
            KvmPlatform.parse(bad)
    assert parse_cpuid_bit("0x80000001:edx:20") == (0x80000001, 0, "edx", 20)
