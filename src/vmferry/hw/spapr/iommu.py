"""``SpaprIommu``: the sPAPR paravirtual IOMMU of one pseries VM, as the VM holds it.

Theory of operation
-------------------
The facade composes the host stack of :mod:`vmferry.hw.spapr.tce` for one guest: the
host's memory map and preregistered RAM, a VFIO container with one IOMMU group (PE) per
assigned device, one hardware table per window (shared by the groups, or one per group),
KVM's in-kernel tables attached to them, and the VMM's tables.  :meth:`SpaprIommu.hcall`
dispatches exactly like KVM in front of a VMM: the kernel handler runs first and, when it
answers H_TOO_HARD, the VMM handler re-executes the whole hypercall -- so the guest never
sees 9999.  Devices DMA through the hardware tables (:meth:`dma_write`, :meth:`dma_read`).

:meth:`check_invariants` checks the INV rules of docs/models/spapr-tce.md §11 (pin safety and mapped
counts, hardware/guest-view agreement, cache coherence, no lock left held) and raises the
first hazard any faulty mode recorded.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from vmferry.errors import ConfigError, HazardError
from vmferry.hw.memory import GuestMemory
from vmferry.hw.spapr import invariants, persist
from vmferry.hw.spapr.hcall import HCALL_ARGC, Hcall, HcallResult, HRet
from vmferry.hw.spapr.hostmem import HostMemoryMap
from vmferry.hw.spapr.hwops import EntryOps, WarnOnce
from vmferry.hw.spapr.hwtable import HardwareTable, IommuGroup, Pe
from vmferry.hw.spapr.kvm_hcalls import KvmTce
from vmferry.hw.spapr.prereg import MmIommu
from vmferry.hw.spapr.qemu_hcalls import QemuTable, QemuTce
from vmferry.hw.spapr.tce import (
    HOST_PAGE_SHIFT,
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    TCE_PERM_MASK,
    DmaFault,
    Quirk,
    quirks_of,
)
from vmferry.hw.spapr.tce_table import GuestView, KvmTceTables
from vmferry.hw.spapr.vfio_tce import VfioSpaprContainer
from vmferry.hw.spapr.windows import WINDOW_PAGE_SHIFTS as WINDOW_PAGE_SHIFTS
from vmferry.hw.spapr.windows import WindowSpec as WindowSpec
from vmferry.hw.spapr.windows import windows_from_definition as windows_from_definition

U64 = np.uint64


class SpaprIommu:
    def __init__(
        self,
        memory: GuestMemory,
        windows: Sequence[WindowSpec],
        *,
        groups: int = 1,
        shared_tables: bool = True,
        mode: str = "correct",
        hw_page_shift: int = HOST_PAGE_SHIFT,
        host: HostMemoryMap | None = None,
        slot_sizes: Sequence[int] | None = None,
        device_memory: GuestMemory | None = None,
    ) -> None:
        self.mode = mode
        self.quirks = quirks_of(mode)
        self.memory = memory
        #: what device DMA writes land in (default ``memory``); a VM passes a view whose
        #: writes bypass the CPU's dirty log, as real device DMA does
        self.device_memory = device_memory if device_memory is not None else memory
        self.host = host or HostMemoryMap.for_ram(memory.size, slot_sizes=slot_sizes)
        self.hw_page_shift = hw_page_shift
        self.shared_tables = shared_tables
        self.hazards: list[HazardError] = []
        self.log: list[str] = []
        self.dma_faults: list[DmaFault] = []
        #: DMA writes that reached pinned host memory no longer part of the guest
        self.orphan_dma: list[tuple[int, int]] = []
        self.warn = WarnOnce()
        self.mm = MmIommu(self.host)
        self.ops = EntryOps(self.mm, self.warn)
        self.container = VfioSpaprContainer(self.mm, self.ops, self.quirks)
        self.groups = [IommuGroup(i, Pe(i)) for i in range(groups)]
        self.container.groups.extend(self.groups)
        for slot in self.host.slots:
            self.container.register_memory(slot.ua, slot.size)
        self.kvm_tables = KvmTceTables(immediate_free=Quirk.IMMEDIATE_FREE in self.quirks)
        self.kvm = KvmTce(
            self.kvm_tables, self.host, self.mm, memory, self.ops, self.quirks, self.hazards
        )
        self.qemu = QemuTce(self.host, memory, self.container, self.quirks, self.log)
        for spec in windows:
            self.add_window(spec)

    # --- windows ---------------------------------------------------------------------------

    def add_window(self, spec: WindowSpec) -> QemuTable:
        if spec.liobn in self.qemu.tables and self.qemu.tables[spec.liobn].enabled:
            raise ConfigError(f"liobn {spec.liobn:#x} already has a window")
        stt = None
        if spec.in_kernel:
            stt = self.kvm_tables.create_64(
                spec.liobn, spec.page_shift, spec.offset >> spec.page_shift, spec.entries
            )
        if self.groups:
            hw_shift = min(spec.page_shift, self.hw_page_shift)
            self.container.create_window(
                spec.liobn, hw_shift, spec.offset, spec.size >> hw_shift, self.shared_tables
            )
            if stt is not None:
                for group in self.groups:
                    self.kvm_tables.attach_group(stt, group, self.kvm_tables)
        view = stt.view if stt is not None else GuestView(spec.entries)
        table = QemuTable(spec.liobn, spec.offset, spec.page_shift, spec.entries, view, stt)
        self.qemu.tables[spec.liobn] = table
        return table

    def remove_window(self, liobn: int) -> None:
        """Disable a window: clear its hardware tables, drop the KVM table."""
        table = self.qemu.tables[liobn]
        if liobn in self.container.windows:
            for hw in self.container.windows.pop(liobn):
                self.ops.clear_accounted(hw, hw.offset, hw.size)
            for group in self.groups:
                group.tables.pop(liobn, None)
        if table.kvm is not None:
            self.kvm_tables.close(table.kvm)
        self.qemu.tables[liobn] = QemuTable(liobn, 0, 0, 0, GuestView(0))

    def window(self, liobn: int) -> QemuTable:
        return self.qemu.tables[liobn]

    def hw_tables(self, liobn: int) -> list[HardwareTable]:
        return list(self.container.windows.get(liobn, []))

    # --- hypercalls --------------------------------------------------------------------

    def _args(self, opcode: int, args: tuple[int, ...]) -> tuple[int, ...] | None:
        try:
            argc = HCALL_ARGC[Hcall(opcode)]
        except ValueError:
            return None
        return (*args[:argc], *([0] * (argc - len(args))))

    def hcall(self, opcode: int, *args: int, vcpu: int = 0) -> HcallResult:
        """What the guest sees: the kernel handler, then the VMM's redo on H_TOO_HARD."""
        regs = self._args(opcode, args)
        if regs is None:
            return HcallResult(HRet.H_FUNCTION)
        result = self.kvm.handle(opcode, regs, vcpu)
        if result.ret == HRet.H_TOO_HARD:
            result = self.qemu.handle(opcode, regs)
        return result

    def kernel_hcall(self, opcode: int, *args: int, vcpu: int = 0) -> HcallResult:
        """Only the kernel's handler (H_TOO_HARD visible): for inspection and tests."""
        regs = self._args(opcode, args)
        if regs is None:
            return HcallResult(HRet.H_FUNCTION)
        return self.kvm.handle(opcode, regs, vcpu)

    # --- memory hot-unplug ---------------------------------------------------------------

    def unplug_memory(self, gpa: int) -> None:
        """Remove the memslot at ``gpa``; the VMM unregisters it and ignores the result."""
        slot = self.host.unplug(gpa)
        try:
            self.container.unregister_memory(slot.ua, slot.size)
        except Exception as exc:  # the VMM only traces the result
            self.log.append(f"unregister {slot.ua:#x}+{slot.size:#x}: {exc}")

    def release_unregistered(self) -> None:
        """Retry unregistering regions whose memslot is gone (correct mode's later release)."""
        for region in list(self.container.regions):
            if self.host.ua_to_gpa(region.ua) is None:
                try:
                    self.container.unregister_memory(region.ua, region.size)
                except Exception as exc:
                    self.log.append(f"unregister {region.ua:#x}: {exc}")

    # --- device DMA ------------------------------------------------------------------------

    def _group(self, group: int) -> IommuGroup:
        if not 0 <= group < len(self.groups):
            raise ConfigError(f"no IOMMU group {group}")
        return self.groups[group]

    def _translate(
        self, liobn: int, ioba: int, n: int, write: bool, group: int
    ) -> list[tuple[int, int]]:
        """(hpa, length) chunks for a DMA, or DmaFault recorded and raised."""
        grp = self._group(group)
        table = grp.tables.get(liobn)
        if table is None:
            return self._fault(liobn, ioba, write, "no DMA window for this device")
        need = TCE_PCI_WRITE if write else TCE_PCI_READ
        chunks, pos = [], ioba
        while pos < ioba + n:
            entry = pos >> table.page_shift
            if not table.offset <= entry < table.offset + table.size:
                return self._fault(liobn, pos, write, "IOBA outside the window")
            tce = table.dma_lookup(grp.pe, entry)
            if not tce & need:
                why = "unmapped IOBA" if not tce & TCE_PERM_MASK else "permission denied"
                return self._fault(liobn, pos, write, why)
            in_page = pos & (table.page_size - 1)
            take = min(table.page_size - in_page, ioba + n - pos)
            chunks.append(((tce & ~(table.page_size - 1) & ~TCE_PERM_MASK) + in_page, take))
            pos += take
        return chunks

    def _fault(self, liobn: int, ioba: int, write: bool, why: str) -> list[tuple[int, int]]:
        fault = DmaFault(liobn, ioba, write, why)
        self.dma_faults.append(fault)
        raise fault

    def dma_write(self, liobn: int, ioba: int, data: bytes, *, group: int = 0) -> None:
        """A device writes ``data`` at ``ioba``; all pages checked before any byte lands."""
        pos = 0
        for hpa, take in self._translate(liobn, ioba, len(data), True, group):
            gpa = self.host.hpa_to_gpa(hpa)
            if gpa is None:
                self.orphan_dma.append((hpa, take))
            else:
                self.device_memory.write(gpa, data[pos : pos + take])
            pos += take

    def dma_read(self, liobn: int, ioba: int, n: int, *, group: int = 0) -> bytes:
        out = bytearray()
        for hpa, take in self._translate(liobn, ioba, n, False, group):
            gpa = self.host.hpa_to_gpa(hpa)
            out += bytes(take) if gpa is None else self.memory.read(gpa, take)
        return bytes(out)

    def dma_writable_ranges(self) -> list[tuple[int, int]]:
        """Guest ranges (gpa, length) a device may write right now (WRITE in the guest view).

        The sPAPR IOMMU has no DMA dirty log: while devices run, a migration source treats
        these pages as dirty on every pass (docs/models/spapr-tce.md §9.3 point 4).
        """
        out: list[tuple[int, int]] = []
        for table in self.qemu.tables.values():
            if not table.enabled:
                continue
            view = table.view.dense()
            writable = np.nonzero(view & U64(TCE_PCI_WRITE))[0]
            mask = U64(TCE_PERM_MASK) | U64(table.page_size - 1)
            for gpa in np.unique(view[writable] & ~mask):
                out.append((int(gpa), table.page_size))
        return sorted(set(out))

    # --- invariants --------------------------------------------------------------------

    def check_invariants(self, *, quiescent: bool = True) -> None:
        """Raise the first recorded hazard or INV violation (see :mod:`.invariants`)."""
        invariants.check(self, quiescent=quiescent)

    def expected_hw(self, table: QemuTable, hw: HardwareTable) -> npt.NDArray[np.uint64]:
        """translate(guest view) for ``hw``: hpa|perm, or 0 where untranslatable."""
        return invariants.expected_hw(self, table, hw)

    def translate_gpa(self, gpa: int, hw: HardwareTable) -> int | None:
        """gpa -> hpa for one page of ``hw`` through memslots and preregistered memory."""
        return invariants.translate_gpa(self, gpa, hw)

    @property
    def pinned_leak(self) -> int:
        return self.container.pinned_leak

    def has_quirk(self, quirk: Quirk) -> bool:
        return quirk in self.quirks

    # --- persist (see vmferry.hw.spapr.persist) ----------------------------------------------

    def save(self) -> persist.SpaprTceState:
        return persist.save(self)

    def restore(self, state: persist.SpaprTceState) -> persist.RebuildReport:
        return persist.restore(self, state)
