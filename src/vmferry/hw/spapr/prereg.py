"""Preregistered guest memory (``mm_iommu``): pinning and the ``used``/``mapped`` counts.

Theory of operation
-------------------
The VMM pins guest RAM up front so that gpa -> ua -> hpa never faults inside a hypercall.
A region counts *users* of the registration (``used``) and *hardware mappings* (``mapped``):
``mapped`` is 1 while the region is registered and unmapped, 1 + n with n hardware entries
pointing into it, and 0 once its release started.  ``mapped_inc`` refuses a region whose
count is 0; ``mapped_dec`` never drops the count below 1.  ``put`` of the last user fails
with EBUSY while mappings exist, so mapped memory is never unpinned (INV-7).

Every region also records which of its host pages a device may have written (exchanging out
an entry with WRITE permission marks the page dirty); unpinning reports them.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.tce import HOST_PAGE_SHIFT, PinLeak, SpaprKernelError
from vmferry.sync import yield_point

HOST_PAGE_SIZE = 1 << HOST_PAGE_SHIFT


@dataclass(eq=False)
class PreregRegion:
    ua: int
    entries: int  # host pages
    pageshift: int  # largest IOMMU page this region can back
    hpas: npt.NDArray[np.uint64]
    used: int = 1
    #: 1 = registered without mappings, 1 + n = n hardware entries, 0 = being released
    mapped: int = 1
    pinned: bool = True
    dirty: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros(0, dtype=np.bool_))

    @property
    def size(self) -> int:
        return self.entries << HOST_PAGE_SHIFT

    @property
    def end(self) -> int:
        return self.ua + self.size

    def covers(self, ua: int, size: int) -> bool:
        return self.ua <= ua and ua + size <= self.end

    def ua_to_hpa(self, ua: int, shift: int) -> int:
        """Host physical address of ``ua`` for an IOMMU page of ``1 << shift``; EFAULT."""
        index = (ua - self.ua) >> HOST_PAGE_SHIFT
        if ua < self.ua or index >= self.entries:
            raise SpaprKernelError(errno.EFAULT, f"ua {ua:#x} outside region {self.ua:#x}")
        if shift > self.pageshift:
            raise SpaprKernelError(
                errno.EFAULT, f"IOMMU page shift {shift} > region page shift {self.pageshift}"
            )
        return int(self.hpas[index]) | (ua & (HOST_PAGE_SIZE - 1))

    def mark_dirty(self, ua: int) -> None:
        index = (ua - self.ua) >> HOST_PAGE_SHIFT
        if 0 <= index < self.entries:
            self.dirty[index] = True


class MmIommu:
    """The per-process list of preregistered regions (``mm->context.iommu_group_mem_list``)."""

    def __init__(self, host: HostMemoryMap) -> None:
        self.host = host
        self.regions: list[PreregRegion] = []
        self.pinned_pages = 0
        #: dirty host pages reported when regions were unpinned
        self.unpinned_dirty: list[int] = []

    def new(self, ua: int, entries: int) -> PreregRegion:
        """Register and pin ``entries`` host pages from ``ua``: EINVAL on overlap, EFAULT."""
        size = entries << HOST_PAGE_SHIFT
        for other in self.regions:
            if other.ua < ua + size and ua < other.end:
                raise SpaprKernelError(errno.EINVAL, f"region {ua:#x}+{size:#x} overlaps")
        hpas = np.zeros(entries, dtype=np.uint64)
        shift = min((ua | size) & -(ua | size), 1 << 63).bit_length() - 1
        for i in range(entries):
            backing = self.host.ua_backing(ua + (i << HOST_PAGE_SHIFT))
            if backing is None:
                raise SpaprKernelError(errno.EFAULT, f"cannot pin ua {ua:#x} page {i}")
            hpas[i] = backing[0]
            shift = min(shift, backing[1])
        region = PreregRegion(ua, entries, shift, hpas, dirty=np.zeros(entries, dtype=np.bool_))
        self.regions.append(region)
        self.pinned_pages += entries
        return region

    def get(self, ua: int, entries: int) -> PreregRegion | None:
        for region in self.regions:
            if region.ua == ua and region.entries == entries:
                region.used += 1
                return region
        return None

    def put(self, region: PreregRegion) -> None:
        """Drop one user; EBUSY while mapped (the user is kept), ENOENT if unused."""
        if region.used == 0:
            raise SpaprKernelError(errno.ENOENT, "region has no users")
        region.used -= 1
        if region.used > 0:
            return
        if region.mapped != 1:
            region.used += 1
            raise SpaprKernelError(errno.EBUSY, f"region {region.ua:#x} still mapped")
        region.mapped = 0
        self._release(region)

    def _release(self, region: PreregRegion) -> None:
        self.regions.remove(region)
        region.pinned = False
        self.pinned_pages -= region.entries
        for i in np.nonzero(region.dirty)[0]:
            self.unpinned_dirty.append(int(region.hpas[i]))

    def lookup(self, ua: int, size: int) -> PreregRegion | None:
        for region in self.regions:
            if region.covers(ua, size):
                return region
        return None

    def mapped_inc(self, region: PreregRegion) -> None:
        yield_point("prereg mapped_inc", region, write=True)
        if region.mapped == 0:
            raise SpaprKernelError(errno.ENXIO, f"region {region.ua:#x} is being released")
        region.mapped += 1

    def mapped_dec(self, region: PreregRegion) -> None:
        yield_point("prereg mapped_dec", region, write=True)
        if region.mapped > 1:
            region.mapped -= 1

    def check_unpinned_safely(self) -> None:
        for region in self.regions:
            if not region.pinned and region.mapped > 1:
                raise PinLeak(f"region {region.ua:#x} unpinned while mapped {region.mapped}")
