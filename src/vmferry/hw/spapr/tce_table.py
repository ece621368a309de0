"""KVM's guest-view TCE tables (``kvmppc_spapr_tce_table``), creation and group attachment.

Theory of operation
-------------------
A guest-view table stores raw TCE values exactly as the guest wrote them, in a sparse array
of host pages (8192 TCEs per 64 KiB page) allocated on demand: storing 0 into a page that
was never allocated allocates nothing, and reading it returns 0.  The VMM shares the same
storage (QEMU mmaps the KVM table), so both hypercall paths write here.

``KVM_CREATE_SPAPR_TCE_64`` validates the window (EINVAL), refuses a LIOBN already in use
(EBUSY) and returns a table; attaching an IOMMU group (``KVM_DEV_VFIO_FILE_SET_SPAPR_TCE``)
links the group's compatible hardware table with a kref counting the groups that share it.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmferry.errors import UseAfterFree
from vmferry.hw.spapr.hwtable import HardwareTable, IommuGroup
from vmferry.hw.spapr.tce import (
    KVM_MAX_PAGE_SHIFT,
    KVM_MIN_PAGE_SHIFT,
    TCES_PER_PAGE,
    U64_MASK,
    OutOfWindow,
    SpaprKernelError,
)
from vmferry.sync import ModelLock, yield_point

#: ioctl payloads, declared once (uapi asm/kvm.h, linux/kvm.h)
KVM_CREATE_SPAPR_TCE = struct.Struct("<QI4x")  # liobn, window_size
KVM_CREATE_SPAPR_TCE_64 = struct.Struct("<QIIQQ")  # liobn, page_shift, flags, offset, size
KVM_VFIO_SPAPR_TCE = struct.Struct("<ii")  # groupfd, tablefd


class GuestView:
    """Raw TCE values of one window, in on-demand 64 KiB pages."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pages: dict[int, npt.NDArray[np.uint64]] = {}

    @property
    def page_count(self) -> int:
        return -(-self.size // TCES_PER_PAGE)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.size:
            raise OutOfWindow(f"guest-view index {index:#x} outside [0, {self.size:#x})")

    def get(self, index: int) -> int:
        self._check(index)
        page = self.pages.get(index // TCES_PER_PAGE)
        return 0 if page is None else int(page[index % TCES_PER_PAGE])

    def put(self, index: int, value: int, *, touch: bool = False) -> None:
        """Store ``value``; a zero into an absent page allocates nothing unless ``touch``."""
        self._check(index)
        yield_point(f"guest view put {index:#x}", (id(self), index), write=True)
        pno = index // TCES_PER_PAGE
        page = self.pages.get(pno)
        if page is None:
            if value == 0 and not touch:
                return
            page = self.pages[pno] = np.zeros(TCES_PER_PAGE, dtype=np.uint64)
        page[index % TCES_PER_PAGE] = value

    def put_range(self, first: int, values: npt.NDArray[np.uint64]) -> None:
        """Vectorised store of consecutive values (same allocation rule as :meth:`put`)."""
        n = len(values)
        if n == 0:
            return
        self._check(first)
        self._check(first + n - 1)
        yield_point(f"guest view put {first:#x}+{n}", (id(self), "range"), write=True)
        pos = 0
        while pos < n:
            index = first + pos
            pno, off = divmod(index, TCES_PER_PAGE)
            take = min(n - pos, TCES_PER_PAGE - off)
            chunk = values[pos : pos + take]
            page = self.pages.get(pno)
            if page is None and chunk.any():
                page = self.pages[pno] = np.zeros(TCES_PER_PAGE, dtype=np.uint64)
            if page is not None:
                page[off : off + take] = chunk
            pos += take

    def dense(self) -> npt.NDArray[np.uint64]:
        out = np.zeros(self.size, dtype=np.uint64)
        for pno, page in self.pages.items():
            lo = pno * TCES_PER_PAGE
            hi = min(lo + TCES_PER_PAGE, self.size)
            out[lo:hi] = page[: hi - lo]
        return out

    def load(self, values: npt.NDArray[np.uint64]) -> None:
        self.pages.clear()
        self.put_range(0, values.astype(np.uint64))

    def nonzero(self) -> list[int]:
        out: list[int] = []
        for pno in sorted(self.pages):
            base = pno * TCES_PER_PAGE
            out.extend(base + int(i) for i in np.nonzero(self.pages[pno])[0])
        return out


@dataclass(eq=False)
class AttachedTable:
    """``kvmppc_spapr_tce_iommu_table``: one per distinct hardware table, kref = groups."""

    table: HardwareTable
    kref: int = 1
    groups: list[IommuGroup] = field(default_factory=list)
    #: set once the element is freed; any later dereference is a use after free
    freed: bool = False

    def get(self) -> HardwareTable:
        """Dereference the element (``stit->tbl``)."""
        yield_point("stit deref", (id(self), "stit"), write=False)
        if self.freed:
            raise UseAfterFree(f"attached table {self.table.name} used after it was freed")
        return self.table


class GuestTceTable:
    """``kvmppc_spapr_tce_table``: LIOBN, window (in IOMMU pages), guest view, attachments."""

    def __init__(self, owner: object, liobn: int, page_shift: int, offset: int, size: int) -> None:
        self.owner = owner
        self.liobn = liobn
        self.page_shift = page_shift
        self.offset = offset  # pages
        self.size = size  # pages
        self.view = GuestView(size)
        self.attached: list[AttachedTable] = []
        self.lock = ModelLock(f"stt {liobn:#x}")
        self.closed = False

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def bus_offset(self) -> int:
        return self.offset << self.page_shift

    @property
    def window_bytes(self) -> int:
        return self.size << self.page_shift

    def elements(self) -> list[AttachedTable]:
        """A snapshot of the attached list (an RCU list walk)."""
        yield_point(f"stt {self.liobn:#x} walk", (self, "attached"), write=False)
        return [a for a in self.attached if a.kref > 0]

    def tables(self) -> list[HardwareTable]:
        return [a.get() for a in self.elements()]


class KvmTceTables:
    """The VM's table list plus the create/attach/release ioctls."""

    def __init__(self, *, immediate_free: bool = False) -> None:
        self.tables: dict[int, GuestTceTable] = {}
        #: free released elements at once instead of after the grace period (H14)
        self.immediate_free = immediate_free
        #: handlers inside an RCU read section; released elements wait for zero
        self.readers = 0
        self.pending: list[AttachedTable] = []

    def read_lock(self) -> None:
        self.readers += 1

    def read_unlock(self) -> None:
        self.readers -= 1
        if self.readers == 0:
            for att in self.pending:
                att.freed = True
            self.pending.clear()

    def _free(self, att: AttachedTable) -> None:
        if self.immediate_free or self.readers == 0:
            att.freed = True
        else:
            self.pending.append(att)

    def find(self, liobn: int) -> GuestTceTable | None:
        yield_point("kvm find liobn", (self, "tables"), write=False)
        return self.tables.get(liobn)

    def create_64(self, liobn: int, page_shift: int, offset: int, size: int) -> GuestTceTable:
        """``KVM_CREATE_SPAPR_TCE_64``: offset and size in IOMMU pages; EINVAL, EBUSY."""
        if size == 0 or not KVM_MIN_PAGE_SHIFT <= page_shift <= KVM_MAX_PAGE_SHIFT:
            raise SpaprKernelError(errno.EINVAL, f"size {size} page_shift {page_shift}")
        if offset + size > (U64_MASK >> page_shift):
            raise SpaprKernelError(errno.EINVAL, f"window {offset:#x}+{size:#x} too large")
        if liobn in self.tables:
            raise SpaprKernelError(errno.EBUSY, f"liobn {liobn:#x} already has a table")
        stt = GuestTceTable(self, liobn, page_shift, offset, size)
        self.tables[liobn] = stt
        return stt

    def close(self, stt: GuestTceTable) -> None:
        """Close the table fd: drop it from the VM and every attached reference."""
        self.tables.pop(stt.liobn, None)
        for att in stt.attached:
            att.kref = 0
            self._free(att)
        stt.attached = []
        stt.closed = True

    def attach_group(self, stt: GuestTceTable | None, group: IommuGroup, vm: object) -> None:
        """``KVM_DEV_VFIO_FILE_SET_SPAPR_TCE``: EBADF, EINVAL, EFAULT as the kernel."""
        if stt is None or stt.closed:
            raise SpaprKernelError(errno.EBADF, "table fd is not open")
        if stt.owner is not self or vm is not self:
            raise SpaprKernelError(errno.EINVAL, "table fd belongs to another VM")
        if not group.tables:
            raise SpaprKernelError(errno.EFAULT, f"group {group.number} has no table group")
        table = self._compatible(stt, group)
        for att in stt.attached:
            if att.table is table:
                if att.kref == 0:
                    raise SpaprKernelError(errno.ENOTTY, "attached table is being freed")
                att.kref += 1
                att.groups.append(group)
                return
        stt.attached.append(AttachedTable(table, 1, [group]))

    @staticmethod
    def _compatible(stt: GuestTceTable, group: IommuGroup) -> HardwareTable:
        for table in group.tables.values():
            if (
                table.page_shift <= stt.page_shift
                and table.bus_offset == stt.bus_offset
                and table.window_bytes >= stt.window_bytes
            ):
                return table
        raise SpaprKernelError(errno.EINVAL, f"group {group.number}: no compatible table")

    def release_group(self, group: IommuGroup) -> None:
        """Drop one kref per attached element using ``group``; free at zero."""
        for stt in self.tables.values():
            for att in list(stt.attached):
                if group in att.groups:
                    yield_point("release group", (stt, "attached"), write=True)
                    att.groups.remove(group)
                    att.kref -= 1
                    if att.kref == 0:
                        stt.attached.remove(att)
                        self._free(att)
