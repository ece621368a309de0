"""The in-kernel (KVM) TCE hypercall handlers.

Theory of operation
-------------------
KVM handles H_PUT_TCE, H_GET_TCE, H_PUT_TCE_INDIRECT and H_STUFF_TCE for LIOBNs that have
an in-kernel table; whatever it cannot finish it answers with H_TOO_HARD, which the
dispatcher (:class:`~vmferry.hw.spapr.iommu.SpaprIommu`) turns into a VMM redo.

The ``correct`` mode (the default) is **vmferry's stricter variant; no kernel does this**.
It reads an indirect list **once** into a 512-entry per-vCPU buffer, validates every entry
of that snapshot before any table changes, sends no-permission entries through the unmap
path, and updates each entry in every attached hardware table or (on failure) clears it in
all of them with accounting and a kill.  Ranges are checked whole against the window, and
one lock per table serialises updates.

The ``kernel`` mode is what ``arch/powerpc/kvm/book3s_64_vio.c`` does; its quirks
(:class:`~vmferry.hw.spapr.tce.Quirk`, :data:`~vmferry.hw.spapr.tce.KERNEL_HANDLER_QUIRKS`)
are two passes over the list in guest memory (validate, then re-read and apply), no
alignment re-check on the re-read value, NONE entries mapped, partial multi-table updates,
rollback clears without accounting or kill, no per-entry serialisation, first-page-only
range checks.  Other faulty modes switch single quirks on (or older kernels' ones, such as
the rollback at the wrong index).  Each records a hazard or breaks an invariant the model
checks.

Validation (:meth:`KvmTce.validate`) is the kernel's in every mode: one hardware IOMMU page
of preregistered memory per attached table, and a memslot for the page holding the address.

Bulk paths (H_STUFF_TCE, and H_PUT_TCE_INDIRECT when the batch is clean) are vectorised with
numpy; they produce exactly the state of the per-entry loop, which stays as the fallback.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import numpy as np
import numpy.typing as npt

from vmferry.errors import GuestMemoryError, HazardError, KernelError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.spapr.hcall import Hcall, HcallResult, HRet
from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.hwops import EntryOps
from vmferry.hw.spapr.hwtable import HardwareTable
from vmferry.hw.spapr.kvm_bulk import BulkPaths
from vmferry.hw.spapr.prereg import MmIommu
from vmferry.hw.spapr.tce import (
    MAX_INDIRECT,
    TCE_LIST_ALIGN_MASK,
    TCE_PERM_MASK,
    U64_MASK,
    DmaDirection,
    OutOfWindow,
    Quirk,
    UnvalidatedTce,
    WrongRollback,
    decode_tce_list,
    tce_address,
    tce_direction,
)
from vmferry.hw.spapr.tce_table import GuestTceTable, KvmTceTables
from vmferry.sync import yield_point

U64 = np.uint64


class KvmTce:
    def __init__(
        self,
        tables: KvmTceTables,
        host: HostMemoryMap,
        mm: MmIommu,
        memory: GuestMemory,
        ops: EntryOps,
        quirks: frozenset[Quirk],
        hazards: list[HazardError],
    ) -> None:
        self.tables = tables
        self.host = host
        self.mm = mm
        self.memory = memory
        self.ops = ops
        self.quirks = quirks
        self.hazards = hazards
        self.srcu_depth = 0
        self.vcpu_buffers: dict[int, npt.NDArray[np.uint64]] = {}
        #: use the numpy bulk paths (False: per-entry loop, the benchmark's baseline)
        self.vectorised = True
        self.enabled: set[int] = {int(h) for h in Hcall}
        self.bulk = BulkPaths(host, mm, ops)

    # --- dispatch ----------------------------------------------------------------------

    def handle(self, opcode: int, args: tuple[int, ...], vcpu: int) -> HcallResult:
        """Run the kernel handler; H_TOO_HARD means "exit to the VMM"."""
        if opcode not in self.enabled:
            return HcallResult(HRet.H_TOO_HARD)
        a = tuple(x & U64_MASK for x in args)
        self.tables.read_lock()
        try:
            return self._dispatch(opcode, a, vcpu)
        finally:
            self.tables.read_unlock()

    def _dispatch(self, opcode: int, a: tuple[int, ...], vcpu: int) -> HcallResult:
        if opcode == Hcall.H_GET_TCE:
            return self.h_get_tce(a[0], a[1])
        if opcode == Hcall.H_PUT_TCE:
            return HcallResult(self.h_put_tce(a[0], a[1], a[2]))
        if opcode == Hcall.H_STUFF_TCE:
            return HcallResult(self.h_stuff_tce(a[0], a[1], a[2], a[3]))
        return HcallResult(self.h_put_tce_indirect(vcpu, a[0], a[1], a[2], a[3]))

    @contextmanager
    def _srcu(self) -> Iterator[None]:
        self.srcu_depth += 1
        try:
            yield
        finally:
            self.srcu_depth -= 1

    def _locked(self, stt: GuestTceTable) -> AbstractContextManager[object]:
        return nullcontext() if Quirk.NO_ENTRY_LOCK in self.quirks else stt.lock

    def _ioba_ok(self, stt: GuestTceTable, ioba: int, npages: int) -> bool:
        if ioba & (stt.page_size - 1):
            return False
        idx = ioba >> stt.page_shift
        if idx < stt.offset:
            return False
        if Quirk.RANGE_FIRST_PAGE in self.quirks:
            return idx < stt.offset + stt.size
        if idx + npages > U64_MASK:
            return False
        return idx - stt.offset + npages <= stt.size

    def _find(self, liobn: int) -> GuestTceTable | None:
        return self.tables.find(liobn)

    # --- validation --------------------------------------------------------------------

    def validate(self, stt: GuestTceTable, tce: int) -> int:
        """``kvmppc_tce_validate``: H_SUCCESS or H_TOO_HARD; nothing changes.

        As lenient as the kernel: the address must be aligned to the guest TCE page
        (``iommu_tce_check_gpa``); ``kvmppc_tce_to_ua`` only asks that the page holding the
        address lies in a memslot (not the whole TCE page); and for each attached hardware
        table ``mm_iommu_lookup`` asks for preregistered memory covering **one hardware
        IOMMU page** at that address.  With 64 KiB guest pages over 4 KiB IOMMU pages the
        other 15 subpages are checked only when they are mapped (``do_map``), where a miss
        is H_TOO_HARD with the entry rolled back.
        """
        if tce_direction(tce) == DmaDirection.NONE:
            return HRet.H_SUCCESS
        gpa = tce_address(tce)
        if gpa & (stt.page_size - 1):
            return HRet.H_TOO_HARD
        ua = self.host.gpa_to_ua(gpa)
        if ua is None:
            return HRet.H_TOO_HARD
        for table in stt.tables():
            region = self.mm.lookup(ua, table.page_size)
            if region is None:
                return HRet.H_TOO_HARD
            try:
                region.ua_to_hpa(ua, table.page_shift)
            except KernelError:
                return HRet.H_TOO_HARD
        return HRet.H_SUCCESS

    def validate_all(self, stt: GuestTceTable, values: npt.NDArray[np.uint64]) -> int:
        """:meth:`validate` over a snapshot (vectorised unless ``vectorised`` is off)."""
        if self.vectorised:
            return self.bulk.validate_all(stt, values)
        for value in values:
            ret = self.validate(stt, int(value))
            if ret != HRet.H_SUCCESS:
                return ret
        return HRet.H_SUCCESS

    # --- H_GET_TCE / H_PUT_TCE ------------------------------------------------------------

    def h_get_tce(self, liobn: int, ioba: int) -> HcallResult:
        stt = self._find(liobn)
        if stt is None:
            return HcallResult(HRet.H_TOO_HARD)
        if not self._ioba_ok(stt, ioba, 1):
            return HcallResult(HRet.H_PARAMETER)
        yield_point("get_tce read", (id(stt.view), ioba >> stt.page_shift), write=False)
        return HcallResult(HRet.H_SUCCESS, (stt.view.get((ioba >> stt.page_shift) - stt.offset),))

    def h_put_tce(self, liobn: int, ioba: int, tce: int) -> int:
        stt = self._find(liobn)
        if stt is None:
            return HRet.H_TOO_HARD
        if not self._ioba_ok(stt, ioba, 1):
            return HRet.H_PARAMETER
        with self._srcu():
            ret = self.validate(stt, tce)
            if ret != HRet.H_SUCCESS:
                return ret
            direction = tce_direction(tce)
            ua = 0
            if direction != DmaDirection.NONE:
                found = self.host.gpa_to_ua(tce_address(tce))
                if found is None:
                    return HRet.H_PARAMETER
                ua = found
            entry = ioba >> stt.page_shift
            with self._locked(stt):
                ret = self.apply_entry(stt, entry, ua, direction, entry, none_via_map=False)
                if ret != HRet.H_SUCCESS:
                    return ret
                stt.view.put(entry - stt.offset, tce)
        return HRet.H_SUCCESS

    # --- per-entry hardware update -----------------------------------------------------

    def apply_entry(
        self,
        stt: GuestTceTable,
        entry: int,
        ua: int,
        direction: DmaDirection,
        first_entry: int,
        *,
        none_via_map: bool,
    ) -> int:
        """Update ``entry`` in every attached table; on failure roll back and return it."""
        elements = stt.elements()
        tables = [a.table for a in elements]
        for k, att in enumerate(elements):
            table = att.get()
            sub = 1 << (stt.page_shift - table.page_shift)
            if direction == DmaDirection.NONE and not none_via_map:
                ret = self._hw_unmap(table, entry * sub, sub)
            else:
                ret = self._hw_map(table, entry * sub, sub, ua, direction)
            if ret != HRet.H_SUCCESS:
                self._rollback(stt, tables, k, entry, first_entry)
                return ret
        return HRet.H_SUCCESS

    def _hw_map(
        self, table: HardwareTable, first: int, sub: int, ua: int, direction: DmaDirection
    ) -> int:
        ret: int = HRet.H_SUCCESS
        for k in range(sub):
            ret = self.ops.map_one(table, first + k, ua + (k << table.page_shift), direction)
            if ret != HRet.H_SUCCESS:
                break
        table.kill(first, sub)
        return ret

    def _hw_unmap(self, table: HardwareTable, first: int, sub: int) -> int:
        ret: int = HRet.H_SUCCESS
        for k in range(sub):
            ret = self.ops.unmap_one(table, first + k)
            if ret != HRet.H_SUCCESS:
                break
        table.kill(first, sub)
        return ret

    def _rollback(
        self,
        stt: GuestTceTable,
        tables: list[HardwareTable],
        failed: int,
        entry: int,
        first_entry: int,
    ) -> None:
        targets = [tables[failed]] if Quirk.PARTIAL_TABLES in self.quirks else tables
        for table in targets:
            sub = 1 << (stt.page_shift - table.page_shift)
            first, count = entry * sub, sub
            if Quirk.ROLLBACK_INDEX in self.quirks:
                first, count = first_entry, 1
                if (first, count) != (entry * sub, sub):
                    self.hazards.append(
                        WrongRollback(
                            f"table {table.name}: rollback cleared hw entry {first:#x} but the "
                            f"failing entry covers {entry * sub:#x}..{entry * sub + sub - 1:#x}"
                        )
                    )
            if Quirk.ROLLBACK_UNACCOUNTED in self.quirks:
                self.ops.clear_unaccounted(table, first, count)
            else:
                self.ops.clear_accounted(table, first, count)

    # --- H_PUT_TCE_INDIRECT ------------------------------------------------------------

    def h_put_tce_indirect(
        self, vcpu: int, liobn: int, ioba: int, tce_list: int, npages: int
    ) -> int:
        stt = self._find(liobn)
        if stt is None:
            return HRet.H_TOO_HARD
        if npages > MAX_INDIRECT or tce_list & TCE_LIST_ALIGN_MASK:
            return HRet.H_PARAMETER
        if not self._ioba_ok(stt, ioba, npages):
            return HRet.H_PARAMETER
        with self._srcu():
            if self.host.gpa_to_ua(tce_list) is None:
                return HRet.H_TOO_HARD
            entry = ioba >> stt.page_shift
            if Quirk.DOUBLE_READ in self.quirks:
                return self._indirect_two_pass(stt, entry, tce_list, npages)
            return self._indirect_snapshot(stt, entry, tce_list, npages, vcpu)

    def _read_list_entry(self, tce_list: int, i: int, label: str) -> int | None:
        yield_point(f"{label} read L[{i}]", ("guest-ram", tce_list >> 12), write=False)
        try:
            return int(decode_tce_list(self.memory.read(tce_list + 8 * i, 8))[0])
        except GuestMemoryError:
            return None

    def _indirect_snapshot(
        self, stt: GuestTceTable, entry: int, tce_list: int, npages: int, vcpu: int
    ) -> int:
        buf = self.vcpu_buffers.setdefault(vcpu, np.zeros(MAX_INDIRECT, dtype=np.uint64))
        yield_point("indirect copy list", ("guest-ram", tce_list >> 12), write=False)
        try:
            buf[:npages] = decode_tce_list(self.memory.read(tce_list, 8 * npages))
        except GuestMemoryError:
            return HRet.H_TOO_HARD
        values = buf[:npages]
        ret = self.validate_all(stt, values)
        if ret != HRet.H_SUCCESS:
            return ret
        with self._locked(stt):
            return self.apply_batch(stt, entry, values)

    def apply_batch(self, stt: GuestTceTable, entry: int, values: npt.NDArray[np.uint64]) -> int:
        """Apply validated ``values`` at ``entry``..: vectorised when clean, else per entry."""
        bulk_ok = self.vectorised and Quirk.ZERO_ENTRY_MAP not in self.quirks
        if bulk_ok and self.bulk.apply(stt, entry, values):
            return HRet.H_SUCCESS
        none_via_map = Quirk.ZERO_ENTRY_MAP in self.quirks
        for i, value in enumerate(int(v) for v in values):
            direction = tce_direction(value)
            ua = 0
            if direction != DmaDirection.NONE or none_via_map:
                found = self.host.gpa_to_ua(tce_address(value))
                if found is None:
                    return HRet.H_PARAMETER
                ua = found
            ret = self.apply_entry(stt, entry + i, ua, direction, entry, none_via_map=none_via_map)
            if ret != HRet.H_SUCCESS:
                return ret
            stt.view.put(entry + i - stt.offset, value)
        return HRet.H_SUCCESS

    def _indirect_two_pass(self, stt: GuestTceTable, entry: int, tce_list: int, npages: int) -> int:
        validated: list[int] = []
        for i in range(npages):
            value = self._read_list_entry(tce_list, i, "pass 1")
            if value is None:
                return HRet.H_TOO_HARD
            ret = self.validate(stt, value)
            if ret != HRet.H_SUCCESS:
                return ret
            validated.append(value)
        none_via_map = Quirk.ZERO_ENTRY_MAP in self.quirks
        with self._locked(stt):
            for i in range(npages):
                value = self._read_list_entry(tce_list, i, "pass 2")
                if value is None:
                    return HRet.H_TOO_HARD
                ret = self._apply_reread(stt, entry, i, value, none_via_map)
                if ret != HRet.H_SUCCESS:
                    return ret
                if value != validated[i]:
                    self.hazards.append(
                        UnvalidatedTce(
                            f"liobn {stt.liobn:#x} entry {entry + i:#x}: applied {value:#x}, "
                            f"validated {validated[i]:#x} (list re-read from guest memory)"
                        )
                    )
        return HRet.H_SUCCESS

    def _apply_reread(
        self, stt: GuestTceTable, entry: int, i: int, value: int, none_via_map: bool
    ) -> int:
        direction = tce_direction(value)
        gpa = tce_address(value)
        if (
            Quirk.NO_ALIGN_RECHECK not in self.quirks
            and direction != DmaDirection.NONE
            and gpa & (stt.page_size - 1)
        ):
            return HRet.H_TOO_HARD
        ua = self.host.gpa_to_ua(gpa)
        if ua is None:
            return HRet.H_PARAMETER
        ret = self.apply_entry(stt, entry + i, ua, direction, entry, none_via_map=none_via_map)
        if ret == HRet.H_SUCCESS:
            stt.view.put(entry + i - stt.offset, value)
        return ret

    # --- H_STUFF_TCE -------------------------------------------------------------------

    def h_stuff_tce(self, liobn: int, ioba: int, tce_value: int, npages: int) -> int:
        stt = self._find(liobn)
        if stt is None:
            return HRet.H_TOO_HARD
        if not self._ioba_ok(stt, ioba, npages):
            return HRet.H_PARAMETER
        if tce_value & TCE_PERM_MASK:
            return HRet.H_PARAMETER
        entry = ioba >> stt.page_shift
        end = min(entry + npages, stt.offset + stt.size)
        with self._locked(stt):
            for table in stt.tables():
                ret = self._stuff_table(stt, table, entry, end)
                if ret != HRet.H_SUCCESS:
                    return ret
            if end > entry:
                stt.view.put_range(
                    entry - stt.offset, np.full(end - entry, tce_value, dtype=np.uint64)
                )
        if entry + npages > end:
            raise OutOfWindow(
                f"H_STUFF_TCE liobn {liobn:#x}: entries {end:#x}..{entry + npages - 1:#x} "
                f"lie past the window end {stt.offset + stt.size:#x}"
            )
        return HRet.H_SUCCESS

    def _stuff_table(self, stt: GuestTceTable, table: HardwareTable, entry: int, end: int) -> int:
        sub = 1 << (stt.page_shift - table.page_shift)
        first, last = entry * sub, end * sub
        if self.vectorised and self.ops.bulk_clear(table, first, last):
            return HRet.H_SUCCESS
        for guest_entry in range(entry, end):
            ret = self._hw_unmap(table, guest_entry * sub, sub)
            if ret == HRet.H_TOO_HARD:
                return ret
        return HRet.H_SUCCESS

    # --- vectorised paths --------------------------------------------------------------
