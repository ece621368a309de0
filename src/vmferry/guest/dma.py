"""A pseries guest's DMA layer: map and unmap buffers with the TCE hypercalls.

Like Linux's pseries IOMMU code, the guest owns an IOBA allocator per DMA window; mapping
a buffer allocates consecutive IOMMU pages and fills their TCEs -- with one H_PUT_TCE for a
single page, or with H_PUT_TCE_INDIRECT from a per-CPU 4 KiB list page (512 entries per
call) when the platform offers ``hcall-multi-tce``; unmapping clears them with H_STUFF_TCE
(or H_PUT_TCE per page without multi-TCE) and frees the IOBAs.  pseries guests use 64 KiB
pages; the IOMMU page of a window may be smaller (4 KiB) or equal.

The layer talks to the platform only through an ``hcall(opcode, *args, vcpu=)`` callable
and guest memory, as a guest kernel does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from vmferry.errors import ModelError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.tce import (
    MAX_INDIRECT,
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    DmaDirection,
    encode_tce_list,
)

GUEST_PAGE_SHIFT = 16


class HcallResultLike(Protocol):
    @property
    def ret(self) -> int: ...

    @property
    def out(self) -> tuple[int, ...]: ...


HcallFn = Callable[..., HcallResultLike]


class GuestDmaError(ModelError):
    """The guest's DMA layer could not map or unmap a buffer."""

    def __init__(self, message: str, ret: int | None = None) -> None:
        self.ret = ret
        super().__init__(message if ret is None else f"{message} (hcall returned {ret})")


_PERM: dict[DmaDirection, int] = {
    DmaDirection.TO_DEVICE: TCE_PCI_READ,
    DmaDirection.FROM_DEVICE: TCE_PCI_WRITE,
    DmaDirection.BIDIRECTIONAL: TCE_PCI_READ | TCE_PCI_WRITE,
}


@dataclass(frozen=True)
class DmaMapping:
    ioba: int  # device address of the first byte
    size: int
    first_page: int  # IOMMU page number inside the window
    npages: int


class GuestDmaWindow:
    """One DMA window as the guest uses it (``struct iommu_table`` on the guest side)."""

    def __init__(
        self,
        hcall: HcallFn,
        memory: GuestMemory,
        *,
        liobn: int,
        offset: int,
        size: int,
        page_shift: int,
        list_page: int,
        multi_tce: bool = True,
        vcpu: int = 0,
    ) -> None:
        if list_page & 0xFFF:
            raise GuestDmaError(f"TCE list page {list_page:#x} is not 4 KiB aligned")
        self.hcall = hcall
        self.memory = memory
        self.liobn, self.offset, self.page_shift = liobn, offset, page_shift
        self.list_page = list_page
        self.multi_tce = multi_tce
        self.vcpu = vcpu
        self.free = np.ones(size >> page_shift, dtype=np.bool_)
        self.mappings: dict[int, DmaMapping] = {}

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    def _alloc(self, npages: int) -> int:
        run = np.convolve(self.free.astype(np.int32), np.ones(npages, dtype=np.int32), "valid")
        hits = np.nonzero(run == npages)[0]
        if len(hits) == 0:
            raise GuestDmaError(f"no {npages} free IOMMU pages in liobn {self.liobn:#x}")
        first = int(hits[0])
        self.free[first : first + npages] = False
        return first

    def map(self, gpa: int, size: int, direction: DmaDirection) -> DmaMapping:
        """Map guest buffer [gpa, gpa+size) for a device; returns its IOBA."""
        if size <= 0 or direction == DmaDirection.NONE:
            raise GuestDmaError(f"cannot map {size} bytes with direction {direction.name}")
        base = gpa & ~(self.page_size - 1)
        npages = -(-(gpa + size - base) // self.page_size)
        first = self._alloc(npages)
        tces = [base + (i << self.page_shift) | _PERM[direction] for i in range(npages)]
        try:
            self._put(first, tces)
        except GuestDmaError:
            self._clear(first, npages)
            self.free[first : first + npages] = True
            raise
        mapping = DmaMapping(
            self.offset + (first << self.page_shift) + (gpa - base), size, first, npages
        )
        self.mappings[mapping.ioba] = mapping
        return mapping

    def adopt(self, ioba: int, size: int) -> DmaMapping:
        """Take over a mapping that already exists in the TCE table (a driver resuming
        from its state in guest memory): marks its IOMMU pages used, no hypercall."""
        rel = ioba - self.offset
        if size <= 0 or rel < 0 or rel + size > len(self.free) << self.page_shift:
            raise GuestDmaError(f"IOBA {ioba:#x}+{size:#x} outside liobn {self.liobn:#x}")
        first = rel >> self.page_shift
        npages = -(-((rel & (self.page_size - 1)) + size) // self.page_size)
        if not self.free[first : first + npages].all():
            raise GuestDmaError(f"IOBA {ioba:#x}+{size:#x} overlaps a mapping")
        self.free[first : first + npages] = False
        mapping = DmaMapping(ioba, size, first, npages)
        self.mappings[ioba] = mapping
        return mapping

    def unmap(self, mapping: DmaMapping) -> None:
        if self.mappings.pop(mapping.ioba, None) is None:
            raise GuestDmaError(f"IOBA {mapping.ioba:#x} is not mapped")
        self._clear(mapping.first_page, mapping.npages)
        self.free[mapping.first_page : mapping.first_page + mapping.npages] = True

    def _ioba(self, page: int) -> int:
        return self.offset + (page << self.page_shift)

    def _call(self, opcode: Hcall, *args: int) -> None:
        result = self.hcall(int(opcode), *args, vcpu=self.vcpu)
        if result.ret != HRet.H_SUCCESS:
            raise GuestDmaError(f"{opcode.name} liobn {self.liobn:#x}", result.ret)

    def _put(self, first: int, tces: list[int]) -> None:
        if len(tces) == 1 or not self.multi_tce:
            for i, tce in enumerate(tces):
                self._call(Hcall.H_PUT_TCE, self.liobn, self._ioba(first + i), tce)
            return
        for pos in range(0, len(tces), MAX_INDIRECT):
            chunk = tces[pos : pos + MAX_INDIRECT]
            self.memory.write(self.list_page, encode_tce_list(chunk))
            self._call(
                Hcall.H_PUT_TCE_INDIRECT,
                self.liobn,
                self._ioba(first + pos),
                self.list_page,
                len(chunk),
            )

    def _clear(self, first: int, npages: int) -> None:
        if self.multi_tce:
            self._call(Hcall.H_STUFF_TCE, self.liobn, self._ioba(first), 0, npages)
            return
        for i in range(npages):
            self._call(Hcall.H_PUT_TCE, self.liobn, self._ioba(first + i), 0)
