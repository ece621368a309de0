"""The pseries machine: 64 KiB guest pages, the sPAPR TCE IOMMU, hypercalls, DMA devices.

Theory of operation
-------------------
``arch = "pseries"`` registers in :data:`vmferry.machine.vm.ARCHES`.  Its setup hook runs
the steps of :data:`SETUP_STEPS` in order on one :class:`PseriesSetup` (append a step to
extend the machine, e.g. with the device tree):

1. :func:`host_step` -- this host's memory map of the guest (:class:`SpaprHostPlatform`,
   from ``HostContext.platform["spapr"]``; host addresses differ per host);
2. :func:`tce_step` -- ``SpaprIommu(vm.ram, windows, host=<that map>)`` for the definition's
   ``tce_windows``, the :class:`SpaprTceHandler`, and ``vm.hcall`` (the hypercalls as the
   guest sees them: KVM first, the VMM's redo on H_TOO_HARD);
3. :func:`dma_devices_step` -- one :class:`SpaprDmaHandler` per ``dma_devices`` entry: a
   receive-DMA device DMAing through the hardware TCE tables and its guest driver, whose
   ring and buffers sit in a DMA area at the top of guest RAM that the workload leaves
   alone (the guest kernel's memory, not the application's);
4. :func:`vfio_step` -- for VFIO ``devices`` (:mod:`vmferry.machine.vfio`): the guest maps
   all of RAM at IOBA = window offset + gpa in a window covering it, and
   ``vm.set_device_memory`` makes each VFIO device DMA through its own IOMMU group;
5. :func:`vmferry.machine.pseries_dt.device_tree_step` -- the device tree firmware hands
   the guest, from the definition and the host's ``[lpm]`` platform table, migrated and
   updated on arrival (``device_tree`` definition key; see that module).

Definition keys::

    tce_windows = [{liobn, offset, size_mib, page_shift[, in_kernel]}]
    dma_devices = [{name, liobn[, buffers=8][, buffer_kib=16][, rate_mbps=4.0]}]

Host platform (``vmferry host serve --platform FILE``, table ``[spapr]``)::

    hpa_base, ua_base      where guest RAM sits on this host (default: derived from the
                           host name, so two hosts really translate differently)
    backing_shift          host page size backing guest RAM: 16 (64 KiB) or 24 (16 MiB)
    memslots               [{size_mib, backing_shift}] (default: one slot, all of RAM)
    iommu_page_shift       largest hardware IOMMU page (12, 16 or 24; default 16)
    tce_mode               TCE model mode of this host (default "correct")

Across migration the guest view of every window travels as the ``spapr-tce`` component; the
destination rebuilds its hardware tables with its own map (docs/models/spapr-tce.md §9.3):
untranslatable entries are cleared and counted in ``post_load`` (the job's
``destination_report``), a failed replay fails the load and the source resumes. Device DMA
bypasses the CPU's dirty log; while ``dma_devices`` (which have no dirty tracking of their
own) run, every page mapped with WRITE in their windows is marked dirty after each burst
of DMA.  VFIO devices log their own DMA.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from vmferry.errors import ConfigError
from vmferry.guest.dma import GuestDmaWindow
from vmferry.guest.workload import Workload
from vmferry.hw.spapr.dmadev import ring_bytes
from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec, windows_from_definition
from vmferry.hw.spapr.tce import (
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    DmaFault,
    SpaprError,
    encode_tce_list,
)
from vmferry.machine.pseries_dma import (
    DeviceDma,
    DmaDeviceSpec,
    PagesBelow,
    SpaprDmaHandler,
    pages64,
)
from vmferry.machine.pseries_dt import KEYS as DEVICE_TREE_KEYS
from vmferry.machine.pseries_dt import device_tree_step
from vmferry.machine.pseries_platform import SpaprHostPlatform
from vmferry.machine.pseries_tce import SpaprTceHandler
from vmferry.machine.ram import PAGE_64K, GuestRam
from vmferry.machine.vm import ARCHES, VM, ArchSupport, HostContext

KEYS: Final = frozenset({"tce_windows", "dma_devices"}) | DEVICE_TREE_KEYS


# --- setup ---------------------------------------------------------------------------------


@dataclass
class PseriesSetup:
    """What the setup steps build, step by step."""

    vm: VM
    definition: Mapping[str, Any]
    host: HostContext
    platform: SpaprHostPlatform | None = None
    iommu: SpaprIommu | None = None
    tce: SpaprTceHandler | None = None
    windows: list[WindowSpec] = field(default_factory=list)
    devices: list[DmaDeviceSpec] = field(default_factory=list)
    guest_windows: dict[int, GuestDmaWindow] = field(default_factory=dict)
    #: the guest's scratch TCE list page (bottom of the DMA area)
    list_page: int = 0


SetupStep = Callable[[PseriesSetup], None]


def host_step(s: PseriesSetup) -> None:
    s.platform = SpaprHostPlatform.from_host(s.host)
    raw = s.definition.get("dma_devices", [])
    if not isinstance(raw, list):
        raise ConfigError("dma_devices must be a list of tables")
    s.devices = [DmaDeviceSpec.from_definition(d) for d in raw]
    names = [d.name for d in s.devices]
    if len(set(names)) != len(names):
        raise ConfigError(f"dma_devices: duplicate names in {names}")


def tce_step(s: PseriesSetup) -> None:
    assert s.platform is not None
    s.windows = windows_from_definition(s.definition)
    try:
        s.iommu = SpaprIommu(
            s.vm.ram,
            s.windows,
            groups=max(1, len(s.devices) + len(s.definition.get("devices") or [])),
            mode=s.platform.tce_mode,
            hw_page_shift=s.platform.iommu_page_shift,
            host=s.platform.memory_map(s.vm.ram.size),
            device_memory=DeviceDma(s.vm.ram),
        )
    except SpaprError as exc:
        raise ConfigError(f"{s.vm.name}: sPAPR IOMMU: {exc}") from exc
    s.tce = SpaprTceHandler(s.iommu, s.vm.ram, s.platform)
    s.vm.add_handler(s.tce)
    s.vm.set_hypercalls(s.iommu.hcall)


def dma_devices_step(s: PseriesSetup) -> None:
    """The DMA area at the top of RAM (a TCE list page, then each device's ring, list
    page and buffers), the devices, and the workload kept below the area."""
    vfio = bool(s.definition.get("devices"))
    if not s.devices and not vfio:
        return
    assert s.iommu is not None and s.tce is not None
    by_liobn = {w.liobn: w for w in s.windows}
    area = PAGE_64K + sum(d.area_bytes for d in s.devices)
    if area > s.vm.ram.size // 4:
        raise ConfigError(f"{s.vm.name}: DMA devices need {area >> 10} KiB, over a quarter of RAM")
    s.list_page = s.vm.ram.size - area
    base = s.list_page + PAGE_64K
    for group, spec in enumerate(s.devices):
        window = by_liobn.get(spec.liobn)
        if window is None:
            raise ConfigError(f"dma device {spec.name}: no tce window with liobn {spec.liobn:#x}")
        if window.page_shift > 16 and spec.buffer_kib * 1024 > 1 << window.page_shift:
            raise ConfigError(f"dma device {spec.name}: buffer larger than an IOMMU page")
        guest = s.guest_windows.get(spec.liobn)
        if guest is None:  # one IOBA allocator per window, shared by its devices
            guest = s.guest_windows[spec.liobn] = GuestDmaWindow(
                s.vm.hcall, s.vm.ram, liobn=window.liobn, offset=window.offset,
                size=window.size, page_shift=window.page_shift,
                list_page=base + pages64(ring_bytes(spec.buffers)),
                vcpu=group % len(s.vm.vcpus),
            )  # fmt: skip
        s.vm.add_handler(SpaprDmaHandler(s.vm, spec, s.tce, guest, group, base))
        base += spec.area_bytes
    vm = s.vm
    vm.workload = Workload(
        vm.definition.workload, PagesBelow(vm.ram, s.list_page // vm.ram.page_size)
    )


def vfio_step(s: PseriesSetup) -> None:
    """VFIO devices DMA through the TCE tables: the guest maps all of its RAM into a
    window that can hold it (the first one no ``dma_devices`` entry uses, else the first),
    at IOBA = window offset + gpa (Linux's direct DMA over a DDW), and each device reaches
    memory through its own IOMMU group."""
    count = len(s.definition.get("devices") or [])
    if not count:
        return
    assert s.iommu is not None and s.tce is not None
    ram = s.vm.ram
    covering = [w for w in s.windows if w.size >= ram.size]
    # prefer a window no untracked DMA device uses: its WRITE mappings count as dirty
    window = next((w for w in covering if w.liobn not in s.guest_windows), None)
    window = window or next(iter(covering), None)
    if window is None:
        raise ConfigError(
            f"{s.vm.name}: VFIO devices on pseries need a tce window covering the "
            f"{ram.size >> 20} MiB of guest RAM"
        )
    shared = s.guest_windows.get(window.liobn)
    if shared is not None:  # the direct mapping's IOBAs are taken in the guest's allocator
        shared.adopt(window.offset, ram.size)
    _direct_map(s.vm, window, s.list_page)
    groups = iter(range(len(s.devices), len(s.devices) + count))

    def port(device: str) -> _TcePort:
        assert s.iommu is not None
        return _TcePort(s.iommu, ram, window, next(groups), device)

    s.vm.set_device_memory(port)


def _direct_map(vm: VM, window: WindowSpec, list_page: int) -> None:
    page = 1 << window.page_shift
    npages = -(-vm.ram.size // page)
    rw = np.uint64(TCE_PCI_READ | TCE_PCI_WRITE)
    for first in range(0, npages, 512):
        n = min(512, npages - first)
        tces = (np.arange(first, first + n, dtype=np.uint64) << np.uint64(window.page_shift)) | rw
        vm.ram.write(list_page, encode_tce_list(tces))
        ioba = window.offset + (first << window.page_shift)
        ret = vm.hcall(int(Hcall.H_PUT_TCE_INDIRECT), window.liobn, ioba, list_page, n).ret
        if ret != HRet.H_SUCCESS:
            raise ConfigError(f"{vm.name}: direct DMA mapping failed with {ret}")


class _TcePort:
    """Guest memory as one VFIO device reaches it: bus address = window offset + gpa,
    through the hardware TCE tables of its IOMMU group.  A refused DMA is recorded by the
    IOMMU and dropped (the PE freezes it); an accepted one is logged dirty by the
    device's own dirty tracking (VFIO DMA logging)."""

    def __init__(
        self, iommu: SpaprIommu, ram: GuestRam, window: WindowSpec, group: int, device: str
    ) -> None:
        self.iommu, self.ram, self.window, self.group = iommu, ram, window, group
        self.device, self.size, self.faults = device, ram.size, 0

    def read(self, gpa: int, n: int) -> bytes:
        try:
            return self.iommu.dma_read(
                self.window.liobn, self.window.offset + gpa, n, group=self.group
            )
        except DmaFault:
            self.faults += 1
            return bytes(n)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        try:
            self.iommu.dma_write(
                self.window.liobn, self.window.offset + gpa, bytes(data), group=self.group
            )
        except DmaFault:
            self.faults += 1
            return
        self.ram.mark_dirty(gpa, len(data))


#: The pseries machine, step by step (extend by appending).
SETUP_STEPS: list[SetupStep] = [
    host_step, tce_step, dma_devices_step, vfio_step, device_tree_step
]


def setup(vm: VM, definition: Mapping[str, Any], host: HostContext) -> None:
    s = PseriesSetup(vm, definition, host)
    for step in SETUP_STEPS:
        step(s)


def tce_handler(vm: VM) -> SpaprTceHandler:
    """The sPAPR IOMMU handler of a pseries VM."""
    handler = vm.handlers.get(SpaprTceHandler.name)
    if not isinstance(handler, SpaprTceHandler):
        raise ConfigError(f"{vm.name} is not a pseries VM")
    return handler


ARCHES["pseries"] = ArchSupport("pseries", page_size=PAGE_64K, extra_keys=KEYS, setup=setup)

__all__ = [
    "SETUP_STEPS",
    "DmaDeviceSpec",
    "PseriesSetup",
    "SpaprDmaHandler",
    "SpaprHostPlatform",
    "SpaprTceHandler",
    "setup",
    "tce_handler",
]
