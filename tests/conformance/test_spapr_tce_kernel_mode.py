"""The kernel's own TCE handlers (mode ``kernel``): what a guest can do to them.

``kernel`` is ``arch/powerpc/kvm/book3s_64_vio.c`` as upstream has it.
``kvmppc_h_put_tce_indirect`` reads every list entry from guest memory and validates it
(``kvmppc_tce_validate``), then reads every entry **again** (``get_user``), translates the
re-read value (``kvmppc_tce_to_ua``) and maps it (``kvmppc_tce_iommu_map``); the kernel's
comment says this is safe because the checks that matter run again.  ``correct`` is
vmferry's stricter variant, which no kernel has: the list is copied once and only the copy
is validated and applied.

Each test is one row of the matrix in ``docs/models/spapr-tce.md`` §10: what the guest does
(a second vCPU rewriting list slot k between the two passes, or a list it writes once), the
kernel mode's outcome, and the stricter variant's.
"""

from __future__ import annotations

import pytest
from spapr_tce_helpers import LIOBN, SpyMemory, call, make, snapshot

from vmferry.hw.spapr.hcall import (
    H_PARAMETER,
    H_PUT_TCE_INDIRECT,
    H_STUFF_TCE,
    H_SUCCESS,
    H_TOO_HARD,
)
from vmferry.hw.spapr.hostmem import DEFAULT_HPA_BASE
from vmferry.hw.spapr.iommu import SpaprIommu
from vmferry.hw.spapr.tce import (
    KERNEL_HANDLER_QUIRKS,
    MODE_HELP,
    MODES,
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    HostCrash,
    MappedCountLeak,
    OutOfWindow,
    Quirk,
    UnvalidatedTce,
    encode_tce_list,
)

RW = TCE_PCI_READ | TCE_PCI_WRITE
L = 0x100000  # list page
A = 0x200000  # buffers
N = 4
LIST_A = [(A + (i << 16)) | RW for i in range(N)]
B_VALID = (A + 0x800000) | RW


def hpa(gpa: int) -> int:
    return DEFAULT_HPA_BASE + gpa


def view(io: SpaprIommu) -> list[int]:
    table = io.window(LIOBN).view
    return [table.get(i) for i in range(N)]


def hw(io: SpaprIommu, entry: int) -> int:
    return io.hw_tables(LIOBN)[0].read(entry)


def rewrite_between_passes(io: SpaprIommu, k: int, new: int) -> None:
    """A second vCPU stores ``new`` into list slot k right after pass 1 read it."""
    mem = io.memory
    assert isinstance(mem, SpyMemory)
    mem.triggers.append((L + 8 * k, 1, lambda: mem.write(L + 8 * k, encode_tce_list([new]))))


def test_kernel_mode_is_the_kernels_handler_quirks() -> None:
    assert MODES["kernel"] == KERNEL_HANDLER_QUIRKS
    assert {Quirk.DOUBLE_READ, Quirk.NO_ALIGN_RECHECK} <= MODES["kernel"]
    assert Quirk.STALE_FALLBACK not in MODES["kernel"]  # QEMU's, not the kernel's
    assert MODES["correct"] == frozenset()
    assert "stricter variant" in MODE_HELP["correct"] and "re-read" in MODE_HELP["kernel"]


def test_g1_valid_rewritten_to_other_valid_is_applied_unvalidated() -> None:
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list(LIST_A))
        rewrite_between_passes(io, N - 1, B_VALID)
        assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert view(kernel)[-1] == B_VALID and hw(kernel, N - 1) == hpa(B_VALID & ~3) | RW
    assert any(isinstance(h, UnvalidatedTce) for h in kernel.hazards)
    assert view(strict) == LIST_A and strict.hazards == []
    strict.check_invariants()


def test_g2_valid_rewritten_outside_ram_is_a_partial_update() -> None:
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list(LIST_A))
        rewrite_between_passes(io, 2, (1 << 40) | RW)
    assert kernel.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_PARAMETER
    assert view(kernel) == [*LIST_A[:2], 0, 0] and hw(kernel, 2) == 0
    assert strict.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert view(strict) == LIST_A


def test_g3_valid_rewritten_to_unregistered_ram_is_too_hard_midway() -> None:
    kernel = make("kernel", slot_sizes=[32 << 20, 32 << 20])
    strict = make("correct", slot_sizes=[32 << 20, 32 << 20])
    for io in (kernel, strict):
        second = io.host.slots[1]
        io.container.unregister_memory(second.ua, second.size)
        io.memory.write(L, encode_tce_list(LIST_A))
        rewrite_between_passes(io, 2, (second.gpa + 0x10000) | RW)
    assert kernel.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_TOO_HARD
    assert view(kernel) == [*LIST_A[:2], 0, 0] and hw(kernel, 2) == 0
    assert strict.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert view(strict) == LIST_A


def test_g4_valid_rewritten_to_zero_maps_a_no_permission_entry() -> None:
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list(LIST_A))
        rewrite_between_passes(io, N - 1, 0)
        assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert view(kernel)[-1] == 0 and hw(kernel, N - 1) == hpa(0)  # mapped, no permission
    assert any(isinstance(h, UnvalidatedTce) for h in kernel.hazards)
    assert view(strict) == LIST_A
    strict.check_invariants()


def test_g5_valid_rewritten_misaligned_crashes_the_host() -> None:
    kernel = make("kernel", page_shift=16, hw_page_shift=16)
    strict = make("correct", page_shift=16, hw_page_shift=16)
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list(LIST_A))
        rewrite_between_passes(io, N - 1, LIST_A[-1] + 0x1000)
    with pytest.raises(HostCrash, match="not aligned"):
        kernel.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N)
    assert call(strict, H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert view(strict) == LIST_A


def test_g6_poison_rewritten_to_valid_is_mapped() -> None:
    poison = 0xDEAD0000
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list([*LIST_A[:-1], poison]))
        rewrite_between_passes(io, N - 1, B_VALID)
        assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, N).ret == H_SUCCESS
    assert hw(kernel, N - 1) == hpa(B_VALID & ~3) | RW
    assert view(strict)[-1] == poison and hw(strict, N - 1) == 0


def test_g7_zero_entry_without_a_race_leaks_a_mapped_count() -> None:
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list([A | RW, 0]))
        assert io.hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, 2).ret == H_SUCCESS
        assert io.hcall(H_STUFF_TCE, LIOBN, 0, 0, 2).ret == H_SUCCESS
    with pytest.raises(MappedCountLeak):
        kernel.check_invariants()
    strict.check_invariants()
    assert strict.mm.regions[0].mapped == 1


def test_g8_range_past_the_window_end_touches_entries_outside_it() -> None:
    last = 0x3FFFF << 12
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list([A | RW, A | RW]))
    with pytest.raises(OutOfWindow):
        kernel.hcall(H_PUT_TCE_INDIRECT, LIOBN, last, L, 2)
    before = snapshot(strict)
    assert call(strict, H_PUT_TCE_INDIRECT, LIOBN, last, L, 2).ret == H_PARAMETER
    assert snapshot(strict) == before


def test_g9_poison_outside_ram_without_a_race_is_a_partial_update() -> None:
    poison = (1 << 40) & ~RW
    kernel, strict = make("kernel"), make("correct")
    for io in (kernel, strict):
        io.memory.write(L, encode_tce_list([A | RW, poison]))
    assert kernel.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, 2).ret == H_PARAMETER
    assert view(kernel)[:2] == [A | RW, 0]
    assert strict.kernel_hcall(H_PUT_TCE_INDIRECT, LIOBN, 0, L, 2).ret == H_SUCCESS
    assert view(strict)[:2] == [A | RW, poison]
