"""The VFIO sPAPR TCE v2 container: memory preregistration and MAP/UNMAP_DMA.

This is the path the VMM takes when KVM punts a hypercall (H_TOO_HARD) and for tables KVM
does not handle.  The container creates one hardware table per DMA window and programs it
into every group (shared tables); with ``shared_tables=False`` every group gets its own
table (groups in separate containers), and a map is applied to each in turn.

MAP_DMA builds the range page by page (``tce_iommu_build_v2``); on error the entries already
written are cleared -- not restored -- and the error returned.  Upstream stops with status 0
when ``mapped_inc`` fails (region being released): quirk ``BUILD_STOP_OK``.
"""

from __future__ import annotations

import errno

from vmferry.hw.spapr.hcall import HRet
from vmferry.hw.spapr.hwops import EntryOps
from vmferry.hw.spapr.hwtable import HardwareTable, IommuGroup
from vmferry.hw.spapr.prereg import MmIommu, PreregRegion
from vmferry.hw.spapr.tce import HOST_PAGE_SHIFT, DmaDirection, PinLeak, Quirk, SpaprKernelError
from vmferry.sync import ModelLock

U64 = 1 << 64


class VfioSpaprContainer:
    def __init__(self, mm: MmIommu, ops: EntryOps, quirks: frozenset[Quirk]) -> None:
        self.mm = mm
        self.ops = ops
        self.quirks = quirks
        self.regions: list[PreregRegion] = []
        self.groups: list[IommuGroup] = []
        #: liobn -> hardware tables of that window (one if shared)
        self.windows: dict[int, list[HardwareTable]] = {}
        self.lock = ModelLock("vfio container")
        #: regions that left every list while still pinned (H10), by identity
        self.orphans: list[PreregRegion] = []

    # --- preregistration ---------------------------------------------------------------

    def register_memory(self, vaddr: int, size: int) -> PreregRegion:
        page = (1 << HOST_PAGE_SHIFT) - 1
        if (vaddr | size) & page or size == 0 or vaddr + size >= U64:
            raise SpaprKernelError(errno.EINVAL, f"vaddr {vaddr:#x} size {size:#x}")
        entries = size >> HOST_PAGE_SHIFT
        for region in self.regions:
            if region.ua == vaddr and region.entries == entries:
                raise SpaprKernelError(errno.EBUSY, "region already registered here")
        found = self.mm.get(vaddr, entries)
        region = found if found is not None else self.mm.new(vaddr, entries)
        self.regions.append(region)
        return region

    def unregister_memory(self, vaddr: int, size: int) -> None:
        """Unregister; correct mode: EBUSY while mapped; ORPHAN quirk: 0 and orphaned."""
        entries = size >> HOST_PAGE_SHIFT
        region = next((r for r in self.mm.regions if r.ua == vaddr and r.entries == entries), None)
        if region is None or region not in self.regions:
            raise SpaprKernelError(errno.ENOENT, f"no region {vaddr:#x}+{size:#x}")
        if Quirk.UNREGISTER_ORPHAN in self.quirks:
            self._unregister_upstream(region)
            return
        self.mm.put(region)  # EBUSY keeps the region listed and pinned
        self.regions.remove(region)

    def _unregister_upstream(self, region: PreregRegion) -> None:
        region.used += 1  # temporary reference (get)
        self.mm.put(region)  # drops the container's reference: returns 0
        self.regions.remove(region)
        try:
            self.mm.put(region)  # drops the temporary one: EBUSY while mapped ...
        except SpaprKernelError:
            self.orphans.append(region)  # ... and the result is discarded

    @property
    def pinned_leak(self) -> int:
        """Bytes pinned by regions nothing can release any more (H10)."""
        return sum(r.size for r in self.orphans if r.pinned)

    def check_pins(self) -> None:
        for region in self.orphans:
            if region.pinned and region.mapped == 1:
                raise PinLeak(
                    f"region {region.ua:#x}+{region.size:#x} orphaned by unregister: "
                    f"pinned with no mappings and no owner"
                )
        self.mm.check_unpinned_safely()

    # --- windows and DMA mapping -------------------------------------------------------

    def create_window(
        self, liobn: int, page_shift: int, bus_offset: int, entries: int, shared: bool
    ) -> list[HardwareTable]:
        tables: list[HardwareTable] = []
        for group in self.groups:
            if shared and tables:
                table = tables[0]
            else:
                table = HardwareTable(f"{liobn:#x}/{len(tables)}", page_shift, bus_offset, entries)
                tables.append(table)
            table.pes.append(group.pe)
            group.tables[liobn] = table
        self.windows[liobn] = tables
        return tables

    def map_dma(
        self, liobn: int, iova: int, vaddr: int, size: int, direction: DmaDirection
    ) -> None:
        """VFIO_IOMMU_MAP_DMA into every table of the window; raises SpaprKernelError."""
        with self.lock:
            for table in self._tables(liobn, iova, size):
                if (size | vaddr) & (table.page_size - 1) or direction == DmaDirection.NONE:
                    raise SpaprKernelError(errno.EINVAL, "misaligned map or no permission")
                first, count = iova >> table.page_shift, size >> table.page_shift
                self._build(table, first, vaddr, count, direction)

    def unmap_dma(self, liobn: int, iova: int, size: int) -> None:
        """VFIO_IOMMU_UNMAP_DMA: clear the range in every table of the window, with kill."""
        with self.lock:
            for table in self._tables(liobn, iova, size):
                first, count = iova >> table.page_shift, size >> table.page_shift
                self.ops.clear_accounted(table, first, count)

    def _tables(self, liobn: int, iova: int, size: int) -> list[HardwareTable]:
        tables = self.windows.get(liobn)
        if not tables:
            raise SpaprKernelError(errno.EINVAL, f"no window for liobn {liobn:#x}")
        table = tables[0]
        if iova & (table.page_size - 1) or size == 0:
            raise SpaprKernelError(errno.EINVAL, f"iova {iova:#x} size {size:#x}")
        if iova < table.bus_offset or iova + size > table.bus_offset + table.window_bytes:
            raise SpaprKernelError(errno.EINVAL, f"iova {iova:#x}+{size:#x} outside window")
        return tables

    def _build(
        self, table: HardwareTable, first: int, ua: int, count: int, direction: DmaDirection
    ) -> None:
        done = 0
        error: SpaprKernelError | None = None
        for i in range(count):
            error = self._build_one(table, first + i, ua + (i << table.page_shift), direction)
            if error is not None:
                break
            done += 1
        if error is None:
            table.kill(first, count)
            return
        if error.errno == errno.ENXIO and Quirk.BUILD_STOP_OK in self.quirks:
            table.kill(first, done)
            return
        self.ops.clear_accounted(table, first, done)
        raise error

    def _build_one(
        self, table: HardwareTable, entry: int, ua: int, direction: DmaDirection
    ) -> SpaprKernelError | None:
        region = self.mm.lookup(ua, table.page_size)
        if region is None:
            return SpaprKernelError(errno.EINVAL, f"ua {ua:#x} not preregistered")
        try:
            hpa = region.ua_to_hpa(ua, table.page_shift)
        except SpaprKernelError:
            return SpaprKernelError(errno.EINVAL, f"ua {ua:#x} cannot back the IOMMU page")
        try:
            self.mm.mapped_inc(region)
        except SpaprKernelError as exc:
            return exc
        result = self.ops.map_prepared(table, entry, ua, hpa, direction, region)
        if result != HRet.H_SUCCESS:
            return SpaprKernelError(errno.EIO, f"exchange failed at entry {entry:#x}")
        return None
