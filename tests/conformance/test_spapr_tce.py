"""Conformance checks of docs/models/spapr-tce.md §14, one test per numbered check."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from spapr_tce_helpers import LIOBN, SpyMemory, call, make, snapshot

from vmferry.errors import StreamDecodeError
from vmferry.hw.spapr import persist
from vmferry.hw.spapr.hcall import (
    H_CLOSED,
    H_GET_TCE,
    H_HARDWARE,
    H_NOT_FOUND,
    H_PARAMETER,
    H_PUT_TCE,
    H_PUT_TCE_INDIRECT,
    H_STUFF_TCE,
    H_SUCCESS,
    H_TOO_HARD,
)
from vmferry.hw.spapr.hostmem import DEFAULT_HPA_BASE
from vmferry.hw.spapr.hwtable import HardwareTable, IommuGroup, Pe
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec
from vmferry.hw.spapr.tce import (
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    DmaDirection,
    HostCrash,
    MappedCountLeak,
    OutOfWindow,
    PinLeak,
    SpaprKernelError,
    TableDivergence,
    TceRestoreError,
    UnvalidatedTce,
    WrongRollback,
    encode_tce_list,
    tce_direction,
)
from vmferry.hw.spapr.tce_table import (
    KVM_CREATE_SPAPR_TCE,
    KVM_CREATE_SPAPR_TCE_64,
    KVM_VFIO_SPAPR_TCE,
    KvmTceTables,
)

RW = TCE_PCI_READ | TCE_PCI_WRITE
L = 0x100000  # list page
A = 0x200000  # a buffer


def hpa(gpa: int) -> int:
    return DEFAULT_HPA_BASE + gpa


def hw0(io: SpaprIommu) -> HardwareTable:
    return io.hw_tables(LIOBN)[0]


def write_list(io: SpaprIommu, values: list[int], at: int = L) -> None:
    io.memory.write(at, encode_tce_list(values))


def region0(io: SpaprIommu) -> int:
    return io.mm.regions[0].mapped


# --- 1-7: constants, directions, table creation -----------------------------------------


def test_check_1_constants() -> None:
    assert (TCE_PCI_READ, TCE_PCI_WRITE) == (0x1, 0x2)
    assert (H_GET_TCE, H_PUT_TCE, H_STUFF_TCE, H_PUT_TCE_INDIRECT) == (0x1C, 0x20, 0x138, 0x13C)
    assert (H_SUCCESS, H_PARAMETER, H_HARDWARE, H_CLOSED) == (0, -4, -1, 2)
    assert (H_NOT_FOUND, H_TOO_HARD) == (-7, 9999)


def test_check_2_direction_decode() -> None:
    assert [tce_direction(x) for x in (0, 1, 2, 3)] == [
        DmaDirection.NONE,
        DmaDirection.TO_DEVICE,
        DmaDirection.FROM_DEVICE,
        DmaDirection.BIDIRECTIONAL,
    ]


def test_check_3_xchg_write_implies_read() -> None:
    table = HardwareTable("t", 12, 0, 16)
    table.xchg_no_kill(3, 0x5000, DmaDirection.FROM_DEVICE)
    assert table.read(3) == 0x5000 | RW
    old_hpa, old_dir = table.xchg_no_kill(3, 0, DmaDirection.NONE)
    assert (old_hpa, old_dir) == (0x5000, DmaDirection.BIDIRECTIONAL)


def test_check_4_create_checks() -> None:
    kvm = KvmTceTables()
    for shift, size in ((12, 0), (11, 1), (35, 1)):
        with pytest.raises(SpaprKernelError) as exc:
            kvm.create_64(1, shift, 0, size)
        assert exc.value.errno == errno.EINVAL
    assert kvm.tables == {}
    assert kvm.create_64(1, 34, 0, 1).page_shift == 34


def test_check_5_create_overflow() -> None:
    kvm = KvmTceTables()
    limit = ((1 << 64) - 1) >> 12
    with pytest.raises(SpaprKernelError) as exc:
        kvm.create_64(1, 12, limit, 1)
    assert exc.value.errno == errno.EINVAL and kvm.tables == {}
    kvm.create_64(1, 12, limit - 1, 1)


def test_check_6_duplicate_liobn() -> None:
    kvm = KvmTceTables()
    first = kvm.create_64(7, 12, 0, 16)
    with pytest.raises(SpaprKernelError) as exc:
        kvm.create_64(7, 16, 0, 32)
    assert exc.value.errno == errno.EBUSY
    assert kvm.tables[7] is first and (first.page_shift, first.size) == (12, 16)


def test_check_7_struct_packing() -> None:
    assert KVM_CREATE_SPAPR_TCE_64.size == 32 and KVM_CREATE_SPAPR_TCE.size == 16
    assert KVM_VFIO_SPAPR_TCE.size == 8
    raw = KVM_CREATE_SPAPR_TCE_64.pack(1, 12, 0, 0x1122, 0x3344)
    assert raw[16:24] == (0x1122).to_bytes(8, "little") and raw[24:] == (0x3344).to_bytes(
        8, "little"
    )


# --- 8-16: H_PUT_TCE / H_GET_TCE ----------------------------------------------------------


def test_check_8_unknown_liobn() -> None:
    io = make()
    assert io.kernel_hcall(H_PUT_TCE, 0x1234, 0, A | RW).ret == H_TOO_HARD
    before = snapshot(io)
    assert call(io, H_PUT_TCE, 0x1234, 0, A | RW).ret == H_PARAMETER
    assert snapshot(io) == before


def test_check_9_misaligned_ioba() -> None:
    io = make()
    before = snapshot(io)
    assert call(io, H_PUT_TCE, LIOBN, 0x1001, A | RW).ret == H_PARAMETER
    assert snapshot(io) == before
    q = make(in_kernel=False)
    assert call(q, H_PUT_TCE, LIOBN, 0x1001, A | RW).ret == H_SUCCESS
    assert q.window(LIOBN).view.get(1) == A | RW
    assert hw0(q).read(1) == hpa(A) | RW


@pytest.mark.parametrize("in_kernel", [True, False])
def test_check_10_ioba_at_window_end(in_kernel: bool) -> None:
    io = make(in_kernel=in_kernel)
    before = snapshot(io)
    assert call(io, H_PUT_TCE, LIOBN, 0x40000 << 12, A | RW).ret == H_PARAMETER
    assert snapshot(io) == before


def test_check_11_stuff_wraps() -> None:
    idx = 5
    io = make()
    before = snapshot(io)
    assert call(io, H_STUFF_TCE, LIOBN, idx << 12, 0, (1 << 64) - idx).ret == H_PARAMETER
    assert snapshot(io) == before
    faulty = make("range_first_page")
    with pytest.raises(OutOfWindow):
        faulty.hcall(H_STUFF_TCE, LIOBN, idx << 12, 0, (1 << 64) - idx)


def test_check_12_poison_entry() -> None:
    io = make()
    call(io, H_PUT_TCE, LIOBN, 0, A | RW)
    assert call(io, H_PUT_TCE, LIOBN, 0, 0xDEAD0000).ret == H_SUCCESS
    assert call(io, H_GET_TCE, LIOBN, 0).out == (0xDEAD0000,)
    assert hw0(io).read(0) == 0 and region0(io) == 1


def test_check_13_misaligned_gpa_64k() -> None:
    io = make(page_shift=16, hw_page_shift=16)
    tce = (A + 0x1000) | RW
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0x10000, tce).ret == H_TOO_HARD
    assert call(io, H_PUT_TCE, LIOBN, 0x10000, tce).ret == H_SUCCESS
    assert call(io, H_GET_TCE, LIOBN, 0x10000).out == (tce,)
    assert hw0(io).read(1) == hpa(A) | RW


@pytest.mark.parametrize("mode", ["correct", "stale_fallback"])
def test_check_14_gpa_outside_ram(mode: str) -> None:
    io = make(mode)
    call(io, H_PUT_TCE, LIOBN, 0x3000, A | RW)
    outside = (1 << 40) | RW
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0x3000, outside).ret == H_TOO_HARD
    assert io.hcall(H_PUT_TCE, LIOBN, 0x3000, outside).ret == H_SUCCESS
    assert io.log and "not RAM" in io.log[-1]
    if mode == "correct":
        assert hw0(io).read(3) == 0
        io.check_invariants()
    else:
        assert hw0(io).read(3) == hpa(A) | RW  # H12: old mapping survives
        with pytest.raises(TableDivergence):
            io.check_invariants()


def test_check_15_get_never_allocates() -> None:
    io = make()
    assert call(io, H_GET_TCE, LIOBN, 0x12345000).out == (0,)
    assert io.window(LIOBN).view.pages == {}


def test_check_16_put_zero_never_allocates() -> None:
    io = make()
    assert call(io, H_PUT_TCE, LIOBN, 0x7000000, 0).ret == H_SUCCESS
    assert io.window(LIOBN).view.pages == {}


# --- 17-32: H_PUT_TCE_INDIRECT ----------------------------------------------------------


def test_check_17_count_513() -> None:
    io = make()
    before = snapshot(io)
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, L, 513).ret == H_PARAMETER
    assert snapshot(io) == before


def test_check_18_misaligned_list() -> None:
    io = make()
    write_list(io, [A | RW], 0x10008)
    before = snapshot(io)
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, 0x10008, 1).ret == H_PARAMETER
    assert snapshot(io) == before


@pytest.mark.parametrize("vectorised", [True, False])
def test_check_19_full_list_page(vectorised: bool) -> None:
    io = make()
    io.kvm.vectorised = vectorised
    vals = [(A + (i << 12)) | RW for i in range(512)]
    write_list(io, vals)
    mem = io.memory
    assert isinstance(mem, SpyMemory)
    mem.reads.clear()
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0x100000, L, 512).ret == H_SUCCESS
    assert mem.reads == [(L, 4096)]
    view = io.window(LIOBN).view
    assert [view.get(0x100 + i) for i in range(512)] == vals
    assert view.get(0xFF) == 0 and view.get(0x100 + 512) == 0
    assert region0(io) == 513


def test_check_20_list_is_big_endian() -> None:
    io = make()
    io.memory.write(L, bytes.fromhex("0000000000100003"))
    call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, L, 1)
    assert call(io, H_GET_TCE, LIOBN, 0).out == (0x100003,)


def test_check_21_count_zero() -> None:
    io = make()
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, L, 0).ret == H_SUCCESS
    outside = 1 << 40
    assert io.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, outside, 0).ret == H_TOO_HARD
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, outside, 0).ret == H_PARAMETER
    q = make(in_kernel=False)
    assert call(q, H_PUT_TCE_INDIRECT, LIOBN, 0, L, 0).ret == H_PARAMETER


def test_check_22_list_outside_memslots() -> None:
    io = make()
    outside = 1 << 40
    before = snapshot(io)
    assert io.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, outside, 4).ret == H_TOO_HARD
    assert snapshot(io) == before
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, outside, 4).ret == H_SUCCESS


def _two_slots(mode: str = "correct", **kw: object) -> SpaprIommu:
    return make(mode, slot_sizes=[32 << 20, 32 << 20], **kw)


def test_check_23_entry_100_not_preregistered() -> None:
    io = _two_slots()
    second = io.host.slots[1]
    io.container.unregister_memory(second.ua, second.size)
    vals = [(A + (i << 12)) | RW for i in range(512)]
    vals[100] = (second.gpa + 0x5000) | RW
    write_list(io, vals)
    before = snapshot(io)
    assert io.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, 512).ret == H_TOO_HARD
    assert snapshot(io) == before
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, L, 512).ret == H_SUCCESS
    view = io.window(LIOBN).view
    assert [view.get(i) for i in range(512)] == vals
    assert hw0(io).read(100) == 0 and any("entry 0x64" in m for m in io.log)


@pytest.mark.parametrize("mode", ["correct", "partial_tables"])
def test_check_24_two_tables_failure(mode: str) -> None:
    io = make(mode, groups=2, shared_tables=False)
    t1, t2 = io.hw_tables(LIOBN)
    e = 0x40
    vals = [(A + (i << 12)) | RW for i in range(512)]
    write_list(io, vals)
    t2.fail_xchg.add(e + 100)
    assert io.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, e << 12, L, 512).ret == H_TOO_HARD
    view = io.window(LIOBN).view
    assert all(t1.read(e + i) == t2.read(e + i) == hpa(A + (i << 12)) | RW for i in range(100))
    assert view.get(e + 99) == vals[99] and view.get(e + 100) == 0
    assert t2.read(e + 100) == 0
    if mode == "correct":
        assert t1.read(e + 100) == 0 and (e + 100, 1) in t1.kill_log
        io.check_invariants()
    else:
        assert t1.read(e + 100) == hpa(A + (100 << 12)) | RW
    t2.fail_xchg.add(e + 100)
    assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, e << 12, L, 512).ret == H_SUCCESS
    if mode == "correct":
        io.check_invariants()
        assert all(t1.read(e + i) == t2.read(e + i) for i in range(512))


@pytest.mark.parametrize("mode", ["correct", "rollback_index"])
def test_check_25_rollback_index(mode: str) -> None:
    io = make(mode, page_shift=16, hw_page_shift=12)
    t = hw0(io)
    e = 4
    write_list(io, [(A + (i << 16)) | RW for i in range(8)])
    call(io, H_PUT_TCE_INDIRECT, LIOBN, e << 16, L, 8)
    write_list(io, [(A + 0x100000 + (i << 16)) | RW for i in range(8)])
    t.fail_xchg.add((e + 3) * 16 + 5)
    assert io.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, e << 16, L, 8).ret == H_TOO_HARD
    failing = range((e + 3) * 16, (e + 3) * 16 + 16)
    if mode == "correct":
        assert all(t.read(x) == 0 for x in failing)
        assert t.read(e) == 0 and t.read(e * 16) != 0
    else:
        assert t.read(e) == 0 and t.read(e * 16 + 1) != 0  # single hw entry E cleared
        assert t.read((e + 3) * 16) != 0  # the failing entry's subpages survive
        with pytest.raises(WrongRollback):
            io.check_invariants()


def test_check_26_kill_covers_subpages_on_every_pe() -> None:
    io = make(page_shift=16, hw_page_shift=12, groups=2)
    t = hw0(io)
    call(io, H_PUT_TCE, LIOBN, 0x30000, A | RW)
    io.dma_write(LIOBN, 0x30000 + 0x1000, b"old", group=1)  # fills PE 1's cache
    call(io, H_PUT_TCE, LIOBN, 0x30000, (A + 0x10000) | RW)
    assert (3 * 16, 16) in t.kill_log
    assert len(t.pes) == 2 and all(pe.kills >= 2 for pe in t.pes)
    io.dma_write(LIOBN, 0x30000 + 0x1000, b"new", group=1)
    assert io.memory.read(A + 0x10000 + 0x1000, 3) == b"new"
    assert io.memory.read(A + 0x1000, 3) == b"old"


@pytest.mark.parametrize("mode", ["correct", "zero_entry_leak", "upstream"])
def test_check_27_zero_entry_in_list(mode: str) -> None:
    io = make(mode)
    write_list(io, [A | RW, 0])
    assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, 2).ret == H_SUCCESS
    if mode == "correct":
        assert region0(io) == 2 and hw0(io).read(1) == 0
        io.check_invariants()
        call(io, H_STUFF_TCE, LIOBN, 0, 0, 2)
        assert region0(io) == 1
        return
    assert hw0(io).read(1) == hpa(0) and region0(io) == 3  # hpa, no permission, counted
    io.hcall(H_STUFF_TCE, LIOBN, 0, 0, 2)
    assert region0(io) == 2  # the NONE entry's count never drops: leak
    with pytest.raises(MappedCountLeak):
        io.check_invariants()


def _race(io: SpaprIommu, k: int, new: int, nth: int) -> None:
    mem = io.memory
    assert isinstance(mem, SpyMemory)
    mem.triggers.append((L + 8 * k, nth, lambda: mem.write(L + 8 * k, encode_tce_list([new]))))


N = 4
LIST_A = [(A + (i << 16)) | RW for i in range(N)]
B_VALID = (A + 0x800000) | RW


@pytest.mark.parametrize("mode", ["correct", "double_read"])
def test_check_28_toctou_t1(mode: str) -> None:
    io = make(mode)
    write_list(io, LIST_A)
    _race(io, N - 1, B_VALID, 1)  # fires right after the first read of L[N-1]
    assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    applied = io.window(LIOBN).view.get(N - 1)
    if mode == "correct":
        assert applied == LIST_A[-1]
        io.check_invariants()
    else:
        assert applied == B_VALID and hw0(io).read(N - 1) == hpa(B_VALID & ~3) | RW
        with pytest.raises(UnvalidatedTce):
            io.check_invariants()


@pytest.mark.parametrize("mode", ["correct", "double_read"])
def test_check_29_toctou_t2_outside_ram(mode: str) -> None:
    io = make(mode)
    write_list(io, LIST_A)
    _race(io, 2, (1 << 40) | RW, 1)
    ret = io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret
    view = io.window(LIOBN).view
    if mode == "correct":
        assert ret == H_SUCCESS and [view.get(i) for i in range(N)] == LIST_A
    else:
        assert ret == H_PARAMETER and [view.get(i) for i in range(N)] == [*LIST_A[:2], 0, 0]


@pytest.mark.parametrize("mode", ["correct", "no_align_recheck"])
def test_check_30_toctou_t5_misaligned(mode: str) -> None:
    io = make(mode, page_shift=16, hw_page_shift=16)
    write_list(io, LIST_A)
    _race(io, N - 1, LIST_A[-1] + 0x1000, 1)
    if mode == "correct":
        assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
        assert io.window(LIOBN).view.get(N - 1) == LIST_A[-1]
    else:
        with pytest.raises(HostCrash):
            io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N)


@pytest.mark.parametrize("mode", ["correct", "double_read"])
def test_check_31_toctou_t6_poison_to_valid(mode: str) -> None:
    io = make(mode)
    poison = 0xDEAD0000
    write_list(io, [*LIST_A[:-1], poison])
    _race(io, N - 1, B_VALID, 1)
    assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    if mode == "correct":
        assert io.window(LIOBN).view.get(N - 1) == poison and hw0(io).read(N - 1) == 0
        io.check_invariants()
    else:
        assert hw0(io).read(N - 1) == hpa(B_VALID & ~3) | RW


@pytest.mark.parametrize(("mode", "nth"), [("correct", 1), ("double_read", 2)])
def test_check_32_write_behind_pass_two(mode: str, nth: int) -> None:
    io = make(mode)
    write_list(io, LIST_A)
    _race(io, 0, B_VALID, 2)  # second read of L[0]: pass 2 already used it
    mem = io.memory
    assert isinstance(mem, SpyMemory)
    mem.triggers = [(L + 8, nth, lambda: mem.write(L, encode_tce_list([B_VALID])))]
    assert call(io, H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert [io.window(LIOBN).view.get(i) for i in range(N)] == LIST_A


# --- 33-35: H_STUFF_TCE -----------------------------------------------------------------


def test_check_33_stuff_with_permission() -> None:
    io = make()
    before = snapshot(io)
    assert io.kernel_hcall(H_STUFF_TCE, LIOBN, 0, A | RW, 4).ret == H_PARAMETER
    assert call(io, H_STUFF_TCE, LIOBN, 0, A | RW, 4).ret == H_PARAMETER
    assert snapshot(io) == before
    q = make(in_kernel=False)
    assert call(q, H_STUFF_TCE, LIOBN, 0, A | TCE_PCI_READ, 4).ret == H_SUCCESS
    assert [q.window(LIOBN).view.get(i) for i in range(4)] == [A | TCE_PCI_READ] * 4
    assert hw0(q).read(3) == hpa(A) | TCE_PCI_READ


def test_check_34_stuff_clears_1000() -> None:
    io = make()
    for pos in range(0, 1000, 500):
        write_list(io, [(A + ((pos + i) << 12)) | RW for i in range(500)])
        call(io, H_PUT_TCE_INDIRECT, LIOBN, pos << 12, L, 500)
    assert region0(io) == 1001
    assert call(io, H_STUFF_TCE, LIOBN, 0, 0, 1000).ret == H_SUCCESS
    assert region0(io) == 1 and not hw0(io).tces.any()
    assert not io.window(LIOBN).view.dense().any()


def test_check_35_stuff_qemu_only_limits() -> None:
    q = make(in_kernel=False, size=1 << 20)
    before = snapshot(q)
    assert call(q, H_STUFF_TCE, LIOBN, 0, 0xBAD0, 257).ret == H_PARAMETER
    assert snapshot(q) == before
    assert call(q, H_STUFF_TCE, LIOBN, 254 << 12, 0xBAD0, 4).ret == H_PARAMETER
    view = q.window(LIOBN).view
    assert [view.get(i) for i in (253, 254, 255)] == [0, 0xBAD0, 0xBAD0]


# --- 36-39: attaching hardware tables ------------------------------------------------------


def _group(shift: int, offset: int, entries: int) -> IommuGroup:
    g = IommuGroup(9, Pe(9))
    g.tables[1] = HardwareTable("g", shift, offset, entries)
    return g


def test_check_36_attach_compatibility() -> None:
    kvm = KvmTceTables()
    stt = kvm.create_64(1, 12, 0, 256)
    for group in (_group(16, 0, 64), _group(12, 0x100000, 256), _group(12, 0, 128)):
        with pytest.raises(SpaprKernelError) as exc:
            kvm.attach_group(stt, group, kvm)
        assert exc.value.errno == errno.EINVAL
    assert stt.attached == []


def test_check_37_shared_table_two_groups() -> None:
    io = make(groups=2)
    stt = io.window(LIOBN).kvm
    assert stt is not None and len(stt.attached) == 1 and stt.attached[0].kref == 2
    t = hw0(io)
    ex, kills = t.exchanges, len(t.kill_log)
    call(io, H_PUT_TCE, LIOBN, 0, A | RW)
    assert t.exchanges == ex + 1 and len(t.kill_log) == kills + 1
    assert all(pe.kills >= 1 for pe in t.pes) and len(t.pes) == 2


def test_check_38_attach_foreign_or_closed() -> None:
    vm1, vm2 = KvmTceTables(), KvmTceTables()
    stt = vm1.create_64(1, 12, 0, 256)
    group = _group(12, 0, 256)
    with pytest.raises(SpaprKernelError) as exc:
        vm2.attach_group(stt, group, vm2)
    assert exc.value.errno == errno.EINVAL
    vm1.close(stt)
    with pytest.raises(SpaprKernelError) as exc:
        vm1.attach_group(stt, group, vm1)
    assert exc.value.errno == errno.EBADF


def test_check_39_release_group_and_close() -> None:
    io = make(groups=2)
    stt = io.window(LIOBN).kvm
    assert stt is not None
    io.kvm_tables.release_group(io.groups[0])
    assert len(stt.attached) == 1 and stt.attached[0].kref == 1
    att = stt.attached[0]
    io.kvm_tables.close(stt)
    assert att.kref == 0 and stt.attached == [] and LIOBN not in io.kvm_tables.tables


# --- 40-46: preregistered memory and VFIO -----------------------------------------------


def test_check_40_prereg_errors() -> None:
    io = _two_slots()
    slot = io.host.slots[0]
    with pytest.raises(SpaprKernelError) as exc:
        io.container.register_memory(slot.ua, slot.size)
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(SpaprKernelError) as exc:
        io.container.register_memory(slot.ua + 1, 1 << 16)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(SpaprKernelError) as exc:
        io.container.register_memory(slot.ua, 1 << 20)
    assert exc.value.errno == errno.EINVAL
    assert len(io.mm.regions) == 2


@pytest.mark.parametrize("mode", ["correct", "unregister_orphan"])
def test_check_41_unregister_mapped_region(mode: str) -> None:
    io = _two_slots(mode)
    slot = io.host.slots[1]
    call(io, H_PUT_TCE, LIOBN, 0, (slot.gpa + 0x10000) | RW)
    region = io.mm.lookup(slot.ua, 4096)
    assert region is not None
    if mode == "correct":
        with pytest.raises(SpaprKernelError) as exc:
            io.container.unregister_memory(slot.ua, slot.size)
        assert exc.value.errno == errno.EBUSY and region in io.container.regions
        call(io, H_PUT_TCE, LIOBN, 0, 0)
        io.container.unregister_memory(slot.ua, slot.size)
        assert not region.pinned and io.pinned_leak == 0
        return
    io.container.unregister_memory(slot.ua, slot.size)  # returns 0
    assert region not in io.container.regions
    assert (region.used, region.mapped, region.pinned) == (1, 2, True)
    io.hcall(H_PUT_TCE, LIOBN, 0, 0)
    assert region.mapped == 1 and region.pinned and io.pinned_leak == slot.size
    with pytest.raises(PinLeak):
        io.check_invariants()


def test_check_42_mapped_inc_dec() -> None:
    io = make()
    region = io.mm.regions[0]
    region.mapped = 0
    with pytest.raises(SpaprKernelError) as exc:
        io.mm.mapped_inc(region)
    assert exc.value.errno == errno.ENXIO and region.mapped == 0
    region.mapped = 1
    io.mm.mapped_dec(region)
    assert region.mapped == 1


def test_check_43_hw_page_larger_than_backing() -> None:
    io = make(page_shift=24, hw_page_shift=24)
    region = io.mm.regions[0]
    with pytest.raises(SpaprKernelError) as exc:
        region.ua_to_hpa(region.ua, 24)
    assert exc.value.errno == errno.EFAULT
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0, (16 << 20) | RW).ret == H_TOO_HARD
    assert call(io, H_PUT_TCE, LIOBN, 0, (16 << 20) | RW).ret == H_SUCCESS
    assert hw0(io).read(0) == 0 and io.log


@pytest.mark.parametrize("mode", ["correct", "upstream"])
def test_check_44_hot_unplug_with_live_tces(mode: str) -> None:
    io = _two_slots(mode)
    slot = io.host.slots[1]
    gpa = slot.gpa + 0x20000
    call(io, H_PUT_TCE, LIOBN, 0, gpa | RW)
    io.unplug_memory(slot.gpa)
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0x1000, gpa | RW).ret == H_TOO_HARD
    assert io.hcall(H_PUT_TCE, LIOBN, 0x1000, gpa | RW).ret == H_SUCCESS
    region = io.mm.lookup(slot.ua, 4096)
    assert region is not None and region.pinned
    assert hw0(io).read(0) == hpa(gpa) | RW  # still points at pinned pages (INV-1)
    io.dma_write(LIOBN, 0, b"late")
    assert io.orphan_dma == [(hpa(gpa), 4)]
    if mode == "correct":
        io.check_invariants()
        call(io, H_PUT_TCE, LIOBN, 0, 0)
        io.release_unregistered()
        assert not region.pinned


def test_check_45_map_dma_partial_prereg() -> None:
    io = _two_slots(page_shift=16, hw_page_shift=16)
    first, second = io.host.slots
    io.container.unregister_memory(second.ua, second.size)
    t = hw0(io)
    t.xchg_no_kill(0, hpa(0x10000), DmaDirection.BIDIRECTIONAL)  # old content, not restored
    t.set_ua(0, first.ua + 0x10000)
    io.mm.regions[0].mapped += 1
    with pytest.raises(SpaprKernelError) as exc:
        io.container.map_dma(LIOBN, 0, second.ua - 5 * 0x10000, 8 * 0x10000, DmaDirection.TO_DEVICE)
    assert exc.value.errno == errno.EINVAL
    assert not t.tces[:8].any()
    io.check_invariants()


@pytest.mark.parametrize("mode", ["correct", "build_stop_ok"])
def test_check_46_map_dma_region_released(mode: str) -> None:
    io = _two_slots(mode, page_shift=16, hw_page_shift=16)
    second = io.host.slots[1]
    io.mm.regions[1].mapped = 0  # being released
    t = hw0(io)
    args = (LIOBN, 0, second.ua - 3 * 0x10000, 8 * 0x10000, DmaDirection.TO_DEVICE)
    if mode == "correct":
        with pytest.raises(SpaprKernelError):
            io.container.map_dma(*args)
        assert not t.tces[:8].any()
    else:
        io.container.map_dma(*args)
        assert int(np.count_nonzero(t.tces[:8])) == 3


# --- 47-52: migration ---------------------------------------------------------------------


def test_check_47_ex_subsection() -> None:
    assert not persist.needs_ex_subsection(persist.WindowState(1, 0, 12, 4, bytes(32)))
    w = persist.WindowState(1, 1 << 59, 16, 4, bytes(32))
    assert persist.needs_ex_subsection(w)
    back = persist.decode_state(persist.encode_state(persist.SpaprTceState((w,))))
    assert (back.windows[0].bus_offset, back.windows[0].page_shift) == (1 << 59, 16)


def _source_with_mappings() -> tuple[SpaprIommu, persist.SpaprTceState]:
    src = make()
    write_list(src, [(A + (i << 12)) | RW for i in range(64)])
    call(src, H_PUT_TCE_INDIRECT, LIOBN, 0, L, 64)
    call(src, H_PUT_TCE, LIOBN, 0x100000, 0xDEAD0000)
    return src, persist.decode_state(persist.encode_state(src.save()))


def test_check_48_liobn_mismatch() -> None:
    _, state = _source_with_mappings()
    dst = SpaprIommu(SpyMemory(64 << 20), [WindowSpec(0x80000001, 0, 1 << 30, 12)])
    before = snapshot(dst)
    with pytest.raises(TceRestoreError):
        dst.restore(state)
    assert snapshot(dst) == before


def test_check_49_disabled_source_window() -> None:
    dst = make()
    state = persist.SpaprTceState((persist.WindowState(LIOBN, 0, 0, 0, b""),))
    dst.restore(state)
    assert dst.window(LIOBN).nb_table == 0 and dst.hw_tables(LIOBN) == []


def test_check_50_ddw_into_disabled_destination() -> None:
    src = SpaprIommu(SpyMemory(64 << 20), [WindowSpec(LIOBN, 1 << 59, 1 << 30, 16)])
    call(src, H_PUT_TCE, LIOBN, (1 << 59) + 0x30000, A | RW)
    call(src, H_PUT_TCE, LIOBN, (1 << 59) + 0x40000, 0xDEAD0000)
    dst = make()
    dst.remove_window(LIOBN)
    dst.restore(persist.decode_state(persist.encode_state(src.save())))
    t = dst.window(LIOBN)
    assert (t.page_shift, t.bus_offset, t.nb_table) == (16, 1 << 59, (1 << 30) >> 16)
    assert np.array_equal(t.view.dense(), src.window(LIOBN).view.dense())
    dst.check_invariants()


@pytest.mark.parametrize("mode", ["correct", "no_rebuild"])
def test_check_51_replay_after_load(mode: str) -> None:
    src, state = _source_with_mappings()
    dst = SpaprIommu(
        SpyMemory(64 << 20),
        [WindowSpec(LIOBN, 0, 1 << 30, 12)],
        mode=mode,
        hw_page_shift=12,
        host=__import__("vmferry.hw.spapr.hostmem", fromlist=["x"]).HostMemoryMap.for_ram(
            64 << 20, ua_base=0x5000_0000_0000, hpa_base=0x3000_0000_0000
        ),
    )
    dst.restore(state)
    assert dst.hcall(H_GET_TCE, LIOBN, 0x5000).out == (src.window(LIOBN).view.get(5),)
    if mode == "correct":
        assert hw0(dst).read(5) == (0x3000_0000_0000 + A + 0x5000) | RW
        assert dst.mm.regions[0].mapped == 65
        dst.check_invariants()
    else:
        assert not hw0(dst).tces.any()
        with pytest.raises(TableDivergence):
            dst.check_invariants()


def test_check_52_replay_failure_fails_load() -> None:
    _, state = _source_with_mappings()
    dst = make()
    hw0(dst).fail_xchg.add(7)
    with pytest.raises(TceRestoreError):
        dst.restore(state)


def test_restore_clears_untranslatable_and_counts() -> None:
    _, state = _source_with_mappings()
    dst = SpaprIommu(SpyMemory(2 << 20), [WindowSpec(LIOBN, 0, 1 << 30, 12)], hw_page_shift=12)
    report = dst.restore(state)
    assert report.cleared == 64 and report.mapped == 0  # A is beyond the 2 MiB destination
    assert not hw0(dst).tces.any()
    dst.check_invariants()


def test_decode_rejects_malformed() -> None:
    _, state = _source_with_mappings()
    data = persist.encode_state(state)
    for bad in (
        b"",
        data[:-3],
        b"XXXX" + data[4:],
        data[:4] + b"\x00\x09" + data[6:],
        data + b"\0",
    ):
        with pytest.raises(StreamDecodeError):
            persist.decode_state(bad)


# --- 53-58: concurrency, warn-once, lock hygiene, accounting, ranges -----------------------


def test_check_55_warn_once_per_host() -> None:
    io = make()
    for _ in range(100):
        hw0(io).fail_xchg.add(0)
        io.hcall(H_PUT_TCE, LIOBN, 0, A | RW)
    assert io.warn.fired == {"do_map xchg": 1}
    assert len(io.warn.log) == 1


def test_check_56_no_lock_left_held() -> None:
    io = make()
    cases = [
        (H_PUT_TCE, 0x1234, 0, 0),
        (H_PUT_TCE, LIOBN, 0x1001, 0),
        (H_PUT_TCE, LIOBN, 0, (1 << 40) | RW),
        (H_PUT_TCE_INDIRECT, LIOBN, 0, L, 513),
        (H_PUT_TCE_INDIRECT, LIOBN, 0, L + 8, 1),
        (H_PUT_TCE_INDIRECT, LIOBN, 0, 1 << 40, 1),
        (H_STUFF_TCE, LIOBN, 0, 3, 1),
        (H_STUFF_TCE, LIOBN, 0x3FFFF000, 0, 2),
        (H_GET_TCE, LIOBN, 1 << 40),
    ]
    for op, *args in cases:
        io.hcall(op, *args)
        assert io.kvm.srcu_depth == 0
        assert not any(s.lock.locked for s in io.kvm_tables.tables.values())
    io.check_invariants()


@pytest.mark.parametrize("mode", ["correct", "rollback_unaccounted"])
def test_check_57_rollback_accounting(mode: str) -> None:
    io = make(mode)
    call(io, H_PUT_TCE, LIOBN, 0x5000, A | RW)
    assert region0(io) == 2
    hw0(io).fail_xchg.add(5)
    assert io.kernel_hcall(H_PUT_TCE, LIOBN, 0x5000, (A + 0x1000) | RW).ret == H_TOO_HARD
    assert hw0(io).read(5) == 0
    if mode == "correct":
        assert region0(io) == 1 and hw0(io).ua(5) == 0
        call(io, H_PUT_TCE, LIOBN, 0x5000, (A + 0x1000) | RW)  # the VMM's redo
        assert region0(io) == 2
    else:
        assert region0(io) == 2
        io.kernel_hcall(H_PUT_TCE, LIOBN, 0x5000, 0)
        assert region0(io) == 2
        with pytest.raises(MappedCountLeak):
            io.check_invariants()


@pytest.mark.parametrize("mode", ["correct", "range_first_page"])
def test_check_58_range_past_window_end(mode: str) -> None:
    last = 0x3FFFF << 12
    io = make(mode)
    write_list(io, [A | RW, A | RW])
    before = snapshot(io)
    if mode == "correct":
        assert call(io, H_STUFF_TCE, LIOBN, last, 0, 2).ret == H_PARAMETER
        assert call(io, H_PUT_TCE_INDIRECT, LIOBN, last, L, 2).ret == H_PARAMETER
        assert snapshot(io) == before
    else:
        with pytest.raises(OutOfWindow):
            io.hcall(H_STUFF_TCE, LIOBN, last, 0, 2)
        with pytest.raises(OutOfWindow):
            io.hcall(H_PUT_TCE_INDIRECT, LIOBN, last, L, 2)
    q = make(in_kernel=False)
    write_list(q, [A | RW, A | RW])
    assert call(q, H_PUT_TCE_INDIRECT, LIOBN, last, L, 2).ret == H_PARAMETER
    assert q.window(LIOBN).view.get(0x3FFFF) == A | RW


@pytest.mark.parametrize("mode", ["correct", "immediate_free"])
def test_check_54_put_tce_racing_group_release(mode: str) -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scenarios"))
    from greenlet_driver import explore

    from vmferry.analysis.explore.api import Instance
    from vmferry.errors import UseAfterFree

    def build(mode: str) -> Instance:
        io = make(mode, size=16 << 20)
        outcome: list[int] = []

        def vcpu() -> None:
            outcome.append(io.hcall(H_PUT_TCE, LIOBN, 0x5000, A | RW).ret)

        def release() -> None:
            io.kvm_tables.release_group(io.groups[0])

        def check() -> None:
            assert outcome == [H_SUCCESS]
            view = io.window(LIOBN).view.get(5)
            assert view in (0, A | RW)  # updated or not at all

        return Instance({"vcpu0": vcpu, "release": release}, check=check)

    explored, failures = explore(lambda: build(mode), preemption_bound=2)
    if mode == "correct":
        assert explored > 5 and failures == []
    else:
        assert failures and all(isinstance(f.error, UseAfterFree) for f in failures)


@pytest.mark.parametrize("mode", ["correct", "no_entry_lock"])
def test_check_53_same_entry_from_two_vcpus(mode: str) -> None:
    """Every interleaving with one preemption, instead of 10,000 random runs."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scenarios"))
    from greenlet_driver import explore

    from vmferry.analysis.explore.api import Instance

    def build(mode: str) -> Instance:
        io = make(mode, size=16 << 20)

        def put(value: int, vcpu: int) -> None:
            assert io.hcall(H_PUT_TCE, LIOBN, 0x5000, value, vcpu=vcpu).ret == H_SUCCESS

        def check() -> None:
            io.check_invariants()  # guest view == hardware translation, INV-2 counts

        return Instance(
            {"vcpu0": lambda: put(A | RW, 0), "vcpu1": lambda: put((A + 0x1000) | RW, 1)},
            check=check,
        )

    explored, failures = explore(lambda: build(mode), preemption_bound=1)
    if mode == "correct":
        assert explored > 10 and failures == []
    else:
        assert failures
        assert {type(f.error) for f in failures} <= {MappedCountLeak, TableDivergence}
