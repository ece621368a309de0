"""Accounted operations on one hardware entry, shared by the KVM and VFIO paths.

``map_one`` and ``unmap_one`` keep the invariant that a hardware entry with a permission
holds the UA it maps in the UA cache and contributes exactly one to its region's ``mapped``
count (INV-2).  ``clear_unaccounted`` is the kernel's rollback ``clear`` that breaks it
(exchanges the entry out without touching counts or the UA cache), kept for faulty modes.
Failures come back as :class:`HRet` codes, as in the kernel (H_TOO_HARD punts to the VMM).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmferry.errors import KernelError
from vmferry.hw.spapr.hcall import HRet
from vmferry.hw.spapr.hwtable import HardwareTable
from vmferry.hw.spapr.prereg import MmIommu, PreregRegion
from vmferry.hw.spapr.tce import (
    HOST_PAGE_SHIFT,
    TCE_PCI_WRITE,
    TCE_PERM_MASK,
    DmaDirection,
    HwExchangeError,
    direction_bits,
)
from vmferry.sync import yield_point

U64 = np.uint64


@dataclass
class WarnOnce:
    """WARN_ON_ONCE: one static flag per call site, per host (INV-6)."""

    fired: dict[str, int] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def __call__(self, site: str, message: str) -> None:
        if site not in self.fired:
            self.fired[site] = 1
            self.log.append(f"WARNING at {site}: {message}")


class EntryOps:
    """Map/unmap one hardware entry with accounting."""

    def __init__(self, mm: MmIommu, warn: WarnOnce) -> None:
        self.mm = mm
        self.warn = warn

    def release_old(self, table: HardwareTable, entry: int, old_dir: DmaDirection) -> bool:
        """Drop the count of what was exchanged out; False if its region is gone."""
        if old_dir == DmaDirection.NONE:
            return True
        ua = table.ua(entry)
        region = self.mm.lookup(ua, table.page_size)
        if region is None:
            return False
        if direction_bits(old_dir) & TCE_PCI_WRITE:
            region.mark_dirty(ua)
        self.mm.mapped_dec(region)
        table.set_ua(entry, 0)
        return True

    def map_one(self, table: HardwareTable, entry: int, ua: int, direction: DmaDirection) -> int:
        region = self.mm.lookup(ua, table.page_size)
        if region is None:
            return HRet.H_TOO_HARD
        try:
            hpa = region.ua_to_hpa(ua, table.page_shift)
        except KernelError:
            self.warn("do_map ua_to_hpa", f"ua {ua:#x} table {table.name}")
            return HRet.H_TOO_HARD
        try:
            self.mm.mapped_inc(region)
        except KernelError:
            return HRet.H_TOO_HARD
        return self.map_prepared(table, entry, ua, hpa, direction, region)

    def map_prepared(
        self,
        table: HardwareTable,
        entry: int,
        ua: int,
        hpa: int,
        direction: DmaDirection,
        region: PreregRegion,
    ) -> int:
        """Exchange in (hpa, direction) whose region count was already taken."""
        try:
            _, old_dir = table.xchg_no_kill(entry, hpa, direction)
        except HwExchangeError:
            self.warn("do_map xchg", f"table {table.name} entry {entry:#x}")
            self.mm.mapped_dec(region)
            return HRet.H_TOO_HARD
        self.release_old(table, entry, old_dir)
        table.set_ua(entry, ua)
        return HRet.H_SUCCESS

    def unmap_one(self, table: HardwareTable, entry: int) -> int:
        try:
            old_hpa, old_dir = table.xchg_no_kill(entry, 0, DmaDirection.NONE)
        except HwExchangeError:
            self.warn("do_unmap xchg", f"table {table.name} entry {entry:#x}")
            return HRet.H_TOO_HARD
        if not self.release_old(table, entry, old_dir):
            table.xchg_no_kill(entry, old_hpa, old_dir)
            return HRet.H_TOO_HARD
        return HRet.H_SUCCESS

    def clear_accounted(self, table: HardwareTable, first: int, count: int) -> None:
        """Rollback clear that keeps INV-2: exchange out, drop counts, zero UA, kill."""
        if count > 1 and self.bulk_clear(table, first, first + count):
            return
        for entry in range(first, first + count):
            try:
                _, old_dir = table.xchg_no_kill(entry, 0, DmaDirection.NONE)
            except HwExchangeError:
                self.warn("clear xchg", f"table {table.name} entry {entry:#x}")
                continue
            self.release_old(table, entry, old_dir)
            table.set_ua(entry, 0)
        table.kill(first, count)

    def clear_unaccounted(self, table: HardwareTable, first: int, count: int) -> None:
        """The kernel's rollback ``clear``: exchange out only (no mapped_dec, no kill)."""
        for entry in range(first, first + count):
            try:
                table.xchg_no_kill(entry, 0, DmaDirection.NONE)
            except HwExchangeError:
                self.warn("clear xchg", f"table {table.name} entry {entry:#x}")

    # --- vectorised clear (same resulting state as the per-entry loop) ------------------

    def release_plan(
        self, table: HardwareTable, lo: int, hi: int
    ) -> tuple[dict[int, int], list[tuple[PreregRegion, npt.NDArray[np.uint64]]]] | None:
        """Counts to drop for the mapped entries in slice [lo, hi); None: per-entry path."""
        old = table.tces[lo:hi].astype(U64)
        mapped = (old & U64(TCE_PERM_MASK)) != 0
        uas = table.ua_cache[lo:hi].astype(U64)[mapped]
        writes = (old[mapped] & U64(TCE_PCI_WRITE)) != 0
        dec: dict[int, int] = {}
        dirty: list[tuple[PreregRegion, npt.NDArray[np.uint64]]] = []
        found = np.zeros(len(uas), dtype=np.bool_)
        for region in self.mm.regions:
            hit = (uas >= U64(region.ua)) & (uas + U64(table.page_size) <= U64(region.end))
            if hit.any():
                dec[id(region)] = int(hit.sum())
                dirty.append((region, uas[hit & writes]))
                found |= hit
        return (dec, dirty) if found.all() else None

    def bulk_clear(self, table: HardwareTable, first: int, last: int) -> bool:
        if last <= first:
            return True
        if any(first <= e < last for e in table.fail_xchg):
            return False
        lo, hi = first - table.offset, last - table.offset
        if lo < 0 or hi > table.size:
            return False
        plan = self.release_plan(table, lo, hi)
        if plan is None:
            return False
        mapped = np.nonzero(table.tces[lo:hi].astype(U64) & U64(TCE_PERM_MASK))[0]
        yield_point(f"hw {table.name} bulk clear", (table.name, "bulk"), write=True)
        table.tces[lo:hi] = 0
        table.ua_cache[lo + mapped] = 0
        table.exchanges += hi - lo
        self.commit_counts({}, *plan)
        table.kill(first, last - first)
        return True

    def commit_counts(
        self,
        inc: dict[int, int],
        dec: dict[int, int],
        dirty: list[tuple[PreregRegion, npt.NDArray[np.uint64]]],
    ) -> None:
        for region in self.mm.regions:
            region.mapped += inc.get(id(region), 0)
            region.mapped = max(1, region.mapped - dec.get(id(region), 0))
        for region, uas in dirty:
            idx = ((uas - U64(region.ua)) >> U64(HOST_PAGE_SHIFT)).astype(np.intp)
            region.dirty[idx] = True
