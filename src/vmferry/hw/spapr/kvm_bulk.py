"""Vectorised (numpy) paths of the in-kernel TCE handlers.

The bulk paths compute a whole batch -- validation of an indirect snapshot, and the update
of every attached hardware table -- as array operations, and commit only when every entry
of every table can be applied; otherwise they decline and the caller runs the kernel's
per-entry loop.  The resulting state (hardware entries, UA caches, mapped counts, dirty
pages, guest view, kills) is the per-entry loop's, which the unit tests check.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vmferry.hw.spapr.hcall import HRet
from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.hwops import EntryOps
from vmferry.hw.spapr.hwtable import HardwareTable
from vmferry.hw.spapr.prereg import MmIommu, PreregRegion
from vmferry.hw.spapr.tce import HOST_PAGE_SHIFT, TCE_PCI_READ, TCE_PCI_WRITE, TCE_PERM_MASK
from vmferry.hw.spapr.tce_table import GuestTceTable
from vmferry.sync import yield_point

U64 = np.uint64


@dataclass
class _TablePlan:
    """A vectorised update of one hardware table (computed before anything changes)."""

    table: HardwareTable
    first: int  # absolute hardware entry
    new_tces: npt.NDArray[np.uint64]
    new_uas: npt.NDArray[np.uint64]
    inc: dict[int, int]  # id(region) -> count
    dec: dict[int, int]
    dirty: list[tuple[PreregRegion, npt.NDArray[np.uint64]]]


class BulkPaths:
    def __init__(self, host: HostMemoryMap, mm: MmIommu, ops: EntryOps) -> None:
        self.host = host
        self.mm = mm
        self.ops = ops

    def validate_all(self, stt: GuestTceTable, values: npt.NDArray[np.uint64]) -> int:
        """Vectorised ``kvmppc_tce_validate`` of every value: H_SUCCESS or H_TOO_HARD."""
        live = (values & U64(TCE_PERM_MASK)) != 0
        gpas = values[live] & ~U64(TCE_PERM_MASK)
        if (gpas & U64(stt.page_size - 1)).any():
            return HRet.H_TOO_HARD
        uas = np.zeros(len(gpas), dtype=U64)
        ok = np.zeros(len(gpas), dtype=np.bool_)
        for slot in self.host.slots:
            hit = (gpas >= U64(slot.gpa)) & (gpas < U64(slot.gpa + slot.size))
            uas[hit] = gpas[hit] - U64(slot.gpa) + U64(slot.ua)
            ok |= hit
        if not ok.all():
            return HRet.H_TOO_HARD
        for table in stt.tables():
            size = U64(table.page_size)  # one hardware IOMMU page, as mm_iommu_lookup
            covered = np.zeros(len(uas), dtype=np.bool_)
            for region in self.mm.regions:
                if region.pageshift < table.page_shift:
                    continue
                covered |= (uas >= U64(region.ua)) & (uas + size <= U64(region.end))
            if not covered.all():
                return HRet.H_TOO_HARD
        return HRet.H_SUCCESS

    def plan_table(
        self,
        page_shift: int,
        table: HardwareTable,
        entry: int,
        uas: npt.NDArray[np.uint64],
        perms: npt.NDArray[np.uint64],
    ) -> _TablePlan | None:
        sub = 1 << (page_shift - table.page_shift)
        first = entry * sub
        n = len(uas) * sub
        lo = first - table.offset
        if lo < 0 or lo + n > table.size or any(first <= e < first + n for e in table.fail_xchg):
            return None
        steps = np.arange(sub, dtype=U64) << U64(table.page_shift)
        ua_sub = (uas[:, None] + steps[None, :]).ravel()
        perm_sub = np.repeat(perms, sub)
        live = perm_sub != 0
        hpa = np.zeros(n, dtype=U64)
        covered = ~live
        inc: dict[int, int] = {}
        for region in self.mm.regions:
            hit = live & (ua_sub >= U64(region.ua))
            hit &= ua_sub + U64(table.page_size) <= U64(region.end)
            if not hit.any():
                continue
            if region.pageshift < table.page_shift or region.mapped == 0:
                return None
            off = ua_sub[hit] - U64(region.ua)
            hpa[hit] = region.hpas[(off >> U64(HOST_PAGE_SHIFT)).astype(np.intp)] | (
                off & U64((1 << HOST_PAGE_SHIFT) - 1)
            )
            inc[id(region)] = int(hit.sum())
            covered |= hit
        if not covered.all() or (hpa & U64(table.page_size - 1)).any():
            return None
        release = self.ops.release_plan(table, lo, lo + n)
        if release is None:
            return None
        bits = np.where(perm_sub & U64(TCE_PCI_WRITE), perm_sub | U64(TCE_PCI_READ), perm_sub)
        new_tces = np.where(live, hpa | bits, U64(0)).astype(U64)
        new_uas = np.where(live, ua_sub, U64(0)).astype(U64)
        return _TablePlan(table, first, new_tces, new_uas, inc, release[0], release[1])

    def apply(self, stt: GuestTceTable, entry: int, values: npt.NDArray[np.uint64]) -> bool:
        if len(values) == 0:
            return True
        perms = values & U64(TCE_PERM_MASK)
        addrs = values & ~U64(TCE_PERM_MASK)
        live = perms != 0
        uas = np.zeros(len(values), dtype=U64)
        covered = ~live
        for slot in self.host.slots:
            hit = live & (addrs >= U64(slot.gpa)) & (addrs < U64(slot.gpa + slot.size))
            uas[hit] = addrs[hit] - U64(slot.gpa) + U64(slot.ua)
            covered |= hit
        if not covered.all():
            return False
        plans = []
        for table in stt.tables():
            plan = self.plan_table(stt.page_shift, table, entry, uas, perms)
            if plan is None:
                return False
            plans.append(plan)
        for plan in plans:
            self.commit_plan(plan)
        stt.view.put_range(entry - stt.offset, values.astype(U64))
        return True

    def commit_plan(self, plan: _TablePlan) -> None:
        table = plan.table
        lo = plan.first - table.offset
        n = len(plan.new_tces)
        yield_point(f"hw {table.name} bulk map", (table.name, "bulk"), write=True)
        table.tces[lo : lo + n] = plan.new_tces
        table.ua_cache[lo : lo + n] = plan.new_uas
        table.exchanges += n
        self.ops.commit_counts(plan.inc, plan.dec, plan.dirty)
        table.kill(plan.first, n)
