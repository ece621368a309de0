"""The VMM's (QEMU's) TCE hypercall handlers: the redo path after H_TOO_HARD.

Theory of operation
-------------------
The VMM keeps the same guest view as KVM (it maps the KVM table) or, for a LIOBN KVM does
not handle, its own.  It never validates TCE values: it masks the IOBA down to the page,
stores the value verbatim and notifies the IOMMU listener, which maps the page-aligned
guest address through VFIO (MAP_DMA into the container's hardware tables) or unmaps it.
Listener errors are only logged; the hypercall result is H_SUCCESS or H_PARAMETER.
Indirect lists and stuff ranges are processed entry by entry and stop at the first
failure (entries before it stay applied).  Count 0 returns H_PARAMETER.

vmferry's stricter ``correct`` mode differs from QEMU in one place (H12): when the new
mapping cannot be established, the entry is unmapped in hardware rather than left holding
the previous mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vmferry.errors import GuestMemoryError, KernelError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.spapr.hcall import Hcall, HcallResult, HRet
from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.tce import (
    MAX_INDIRECT,
    TCE_LIST_ALIGN_MASK,
    TCE_PERM_MASK,
    U64_MASK,
    DmaDirection,
    Quirk,
    decode_tce_list,
    tce_direction,
)
from vmferry.hw.spapr.tce_table import GuestTceTable, GuestView
from vmferry.hw.spapr.vfio_tce import VfioSpaprContainer


@dataclass(eq=False)
class QemuTable:
    """``SpaprTceTable``: a window as the VMM sees it (nb_table 0 = disabled)."""

    liobn: int
    bus_offset: int
    page_shift: int
    nb_table: int
    view: GuestView
    kvm: GuestTceTable | None = None

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def enabled(self) -> bool:
        return self.nb_table > 0


class QemuTce:
    def __init__(
        self,
        host: HostMemoryMap,
        memory: GuestMemory,
        container: VfioSpaprContainer,
        quirks: frozenset[Quirk],
        log: list[str],
    ) -> None:
        self.host = host
        self.memory = memory
        self.container = container
        self.quirks = quirks
        self.log = log
        self.tables: dict[int, QemuTable] = {}

    def find(self, liobn: int) -> QemuTable | None:
        if liobn >> 32:
            return None
        table = self.tables.get(liobn)
        return table if table is not None and table.enabled else None

    def handle(self, opcode: int, args: tuple[int, ...]) -> HcallResult:
        a = tuple(x & U64_MASK for x in args)
        table = self.find(a[0])
        if table is None:
            return HcallResult(HRet.H_PARAMETER)
        ioba = a[1] & ~(table.page_size - 1)
        if opcode == Hcall.H_GET_TCE:
            index = self._index(table, ioba)
            if index is None:
                return HcallResult(HRet.H_PARAMETER)
            return HcallResult(HRet.H_SUCCESS, (table.view.get(index),))
        if opcode == Hcall.H_PUT_TCE:
            return HcallResult(self.put(table, ioba, a[2]))
        if opcode == Hcall.H_STUFF_TCE:
            return HcallResult(self.stuff(table, ioba, a[2], a[3]))
        return HcallResult(self.put_indirect(table, ioba, a[2], a[3]))

    @staticmethod
    def _index(table: QemuTable, ioba: int) -> int | None:
        index = ((ioba - table.bus_offset) & U64_MASK) >> table.page_shift
        return index if index < table.nb_table else None

    def put(self, table: QemuTable, ioba: int, tce: int) -> int:
        index = self._index(table, ioba)
        if index is None:
            return HRet.H_PARAMETER
        table.view.put(index, tce, touch=True)
        self.notify(table, index, tce)
        return HRet.H_SUCCESS

    def put_indirect(self, table: QemuTable, ioba: int, tce_list: int, npages: int) -> int:
        if npages > MAX_INDIRECT or tce_list & TCE_LIST_ALIGN_MASK:
            return HRet.H_PARAMETER
        ret: int = HRet.H_PARAMETER
        for i in range(npages):
            ret = self.put(table, ioba + (i << table.page_shift), self._ldq_be(tce_list + 8 * i))
            if ret != HRet.H_SUCCESS:
                break
        return ret

    def stuff(self, table: QemuTable, ioba: int, value: int, npages: int) -> int:
        if npages > table.nb_table or npages == 0:
            return HRet.H_PARAMETER
        index = self._index(table, ioba)
        if index is None:
            return HRet.H_PARAMETER
        count = min(npages, table.nb_table - index)
        table.view.put_range(index, np.full(count, value, dtype=np.uint64))
        if tce_direction(value) == DmaDirection.NONE:
            self._unmap(table, index, count)
        else:
            for i in range(index, index + count):
                self.notify(table, i, value)
        return HRet.H_SUCCESS if count == npages else HRet.H_PARAMETER

    def _ldq_be(self, gpa: int) -> int:
        """A big-endian physical load; unassigned guest addresses read as 0 (assumed)."""
        if self.host.slot_of_gpa(gpa) is None:
            return 0
        try:
            return int(decode_tce_list(self.memory.read(gpa, 8))[0])
        except GuestMemoryError:
            return 0

    # --- the IOMMU listener (VFIO) -------------------------------------------------------

    def notify(self, table: QemuTable, index: int, tce: int) -> None:
        if table.liobn not in self.container.windows:
            return
        direction = tce_direction(tce)
        if direction == DmaDirection.NONE:
            self._unmap(table, index, 1)
            return
        iova = table.bus_offset + (index << table.page_shift)
        gpa = tce & ~TCE_PERM_MASK & ~(table.page_size - 1) & U64_MASK
        ua = self.host.gpa_to_ua(gpa)
        if ua is None or self.host.gpa_to_ua(gpa + table.page_size - 1) is None:
            self._map_failed(table, index, f"gpa {gpa:#x} is not RAM")
            return
        try:
            self.container.map_dma(table.liobn, iova, ua, table.page_size, direction)
        except KernelError as exc:
            self._map_failed(table, index, f"VFIO MAP_DMA iova {iova:#x}: {exc}")

    def _map_failed(self, table: QemuTable, index: int, why: str) -> None:
        self.log.append(f"liobn {table.liobn:#x} entry {index:#x}: {why}")
        if Quirk.STALE_FALLBACK not in self.quirks:
            self._unmap(table, index, 1)

    def _unmap(self, table: QemuTable, index: int, count: int) -> None:
        if table.liobn not in self.container.windows or count == 0:
            return
        iova = table.bus_offset + (index << table.page_shift)
        try:
            self.container.unmap_dma(table.liobn, iova, count << table.page_shift)
        except KernelError as exc:
            self.log.append(f"liobn {table.liobn:#x} VFIO UNMAP_DMA iova {iova:#x}: {exc}")
