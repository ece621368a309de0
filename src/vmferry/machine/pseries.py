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
import numpy.typing as npt
import xxhash

from vmferry.errors import ConfigError, MigrationRefused
from vmferry.guest.dma import GuestDmaError, GuestDmaWindow
from vmferry.guest.dma_driver import RxRingDriver
from vmferry.guest.workload import Workload
from vmferry.hw.spapr import persist
from vmferry.hw.spapr.dmadev import (
    MAX_RING,
    DmaDeviceError,
    SpaprDmaEngine,
    decode_state,
    encode_state,
    ring_bytes,
)
from vmferry.hw.spapr.hcall import Hcall, HRet
from vmferry.hw.spapr.hostmem import DEFAULT_HPA_BASE, HostMemoryMap, Memslot
from vmferry.hw.spapr.iommu import SpaprIommu, WindowSpec, windows_from_definition
from vmferry.hw.spapr.tce import (
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    TCE_PERM_MASK,
    DmaFault,
    Quirk,
    SpaprError,
    encode_tce_list,
    quirks_of,
)
from vmferry.machine.handlers import BlobHandler, ComponentData, StatePiece
from vmferry.machine.pseries_dt import KEYS as DEVICE_TREE_KEYS
from vmferry.machine.pseries_dt import device_tree_step
from vmferry.machine.ram import PAGE_64K, GuestRam
from vmferry.machine.vm import ARCHES, VM, ArchSupport, HostContext

MIB: Final = 1 << 20
KEYS: Final = frozenset({"tce_windows", "dma_devices"}) | DEVICE_TREE_KEYS
IOMMU_PAGE_SHIFTS: Final = (12, 16, 24)
BACKING_SHIFTS: Final = (16, 24)
_PLATFORM_KEYS = {
    "hpa_base",
    "ua_base",
    "backing_shift",
    "memslots",
    "iommu_page_shift",
    "tce_mode",
}
_DEVICE_KEYS = {"name", "liobn", "buffers", "buffer_kib", "rate_mbps"}
_ADDR_STRIDE = 1 << 36
DEFAULT_UA_BASE: Final = 0x7000_0000_0000


# --- the host platform ---------------------------------------------------------------------


def _int(d: Mapping[str, Any], key: str, default: int) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"spapr platform {key} must be a non-negative integer, not {value!r}")
    return value


@dataclass(frozen=True)
class SpaprHostPlatform:
    """How one host backs a pseries guest's RAM and which IOMMU pages its PHBs use."""

    hpa_base: int
    ua_base: int
    iommu_page_shift: int = 16
    #: (size in bytes, backing page shift) per memslot; empty: one slot for all of RAM
    memslots: tuple[tuple[int, int], ...] = ()
    backing_shift: int = 16
    tce_mode: str = "correct"

    @classmethod
    def from_host(cls, host: HostContext) -> SpaprHostPlatform:
        raw = host.platform.get("spapr", {})
        if not isinstance(raw, Mapping):
            raise ConfigError("host platform [spapr] must be a table")
        unknown = set(raw) - _PLATFORM_KEYS
        if unknown:
            raise ConfigError(f"unknown spapr platform keys {sorted(unknown)}")
        h = xxhash.xxh64_intdigest(host.name.encode())
        hpa = _int(raw, "hpa_base", DEFAULT_HPA_BASE + (h % 1024) * _ADDR_STRIDE)
        ua = _int(raw, "ua_base", DEFAULT_UA_BASE + ((h >> 10) % 256) * _ADDR_STRIDE)
        shift = _int(raw, "iommu_page_shift", 16)
        backing = _int(raw, "backing_shift", 16)
        if shift not in IOMMU_PAGE_SHIFTS or backing not in BACKING_SHIFTS:
            raise ConfigError(
                f"spapr platform: iommu_page_shift {shift} not in {IOMMU_PAGE_SHIFTS} or "
                f"backing_shift {backing} not in {BACKING_SHIFTS}"
            )
        if (hpa | ua) & ((1 << 24) - 1):
            raise ConfigError("spapr platform: hpa_base and ua_base must be 16 MiB aligned")
        mode = raw.get("tce_mode", "correct")
        if not isinstance(mode, str):
            raise ConfigError(f"spapr platform tce_mode must be a string, not {mode!r}")
        quirks_of(mode)  # ConfigError for an unknown mode
        return cls(hpa, ua, shift, _memslots(raw.get("memslots", [])), backing, mode)

    def memory_map(self, ram_size: int) -> HostMemoryMap:
        """This host's memslots for ``ram_size`` bytes of guest RAM (contiguous backing)."""
        slots = self.memslots or ((ram_size, self.backing_shift),)
        if sum(size for size, _ in slots) != ram_size:
            raise ConfigError(
                f"spapr memslots cover {sum(s for s, _ in slots) >> 20} MiB, "
                f"the guest has {ram_size >> 20} MiB"
            )
        out, gpa = [], 0
        for size, backing in slots:
            if gpa & ((1 << backing) - 1):
                raise ConfigError(f"memslot at gpa {gpa:#x} not aligned to its backing page")
            out.append(Memslot(gpa, size, self.ua_base + gpa, self.hpa_base + gpa, backing))
            gpa += size
        try:
            return HostMemoryMap(out)
        except SpaprError as exc:
            raise ConfigError(f"spapr memslots: {exc}") from exc


def _memslots(raw: object) -> tuple[tuple[int, int], ...]:
    if not isinstance(raw, list):
        raise ConfigError("spapr platform memslots must be a list of tables")
    out = []
    for slot in raw:
        if not isinstance(slot, Mapping) or set(slot) - {"size_mib", "backing_shift"}:
            raise ConfigError(f"spapr memslot {slot!r}: keys are size_mib, backing_shift")
        size = _int(slot, "size_mib", 0) * MIB
        backing = _int(slot, "backing_shift", 16)
        if size == 0 or backing not in BACKING_SHIFTS or size & ((1 << backing) - 1):
            raise ConfigError(f"spapr memslot {dict(slot)}: empty, or not whole backing pages")
        out.append((size, backing))
    return tuple(out)


# --- the TCE tables as a migration handler -------------------------------------------------


class SpaprTceHandler(BlobHandler):
    """The sPAPR IOMMU of a VM: TCE guest view in the stream, rebuild on load
    (docs/models/spapr-tce.md §9.3)."""

    name = "spapr-tce"

    def __init__(self, iommu: SpaprIommu, ram: GuestRam, platform: SpaprHostPlatform) -> None:
        self.iommu, self.ram, self.platform = iommu, ram, platform
        #: windows of DMA devices that cannot report their own dirty pages: their WRITE
        #: mappings count as dirty
        self.untracked_liobns: set[int] = set()
        self.rebuild: persist.RebuildReport | None = None

    # --- both sides --------------------------------------------------------------------

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mode": self.iommu.mode,
            "windows": [
                _window_json(self.iommu, liobn) for liobn in sorted(self.iommu.qemu.tables)
            ],
            "dma_faults": len(self.iommu.dma_faults),
            "last_dma_fault": str(self.iommu.dma_faults[-1]) if self.iommu.dma_faults else "",
            "invariants": _invariants(self.iommu),
            "host": {
                "hpa_base": self.platform.hpa_base,
                "iommu_page_shift": self.platform.iommu_page_shift,
            },
        }
        if self.rebuild is not None:
            out["rebuild"] = _rebuild_json(self.rebuild)
        return out

    def state_digest(self) -> str:
        """The guest view and where every hardware entry reaches in guest memory: equal on
        both hosts when device DMA reaches the same guest pages (hpas differ)."""
        h = xxhash.xxh3_128(persist.encode_state(self.iommu.save()))
        for liobn in sorted(self.iommu.container.windows):
            for hw in self.iommu.hw_tables(liobn):
                h.update(_hw_reach(self.iommu, hw).tobytes())
        return h.hexdigest()

    # --- source ------------------------------------------------------------------------

    def capabilities(self) -> dict[str, Any]:
        regions = []
        for region in self.iommu.mm.regions:
            gpa = self.iommu.host.ua_to_gpa(region.ua)
            if gpa is not None:
                regions.append([gpa, region.size, region.pageshift])
        return {
            "rebuild": not self.iommu.has_quirk(Quirk.NO_REBUILD),
            "iommu_page_shift": self.platform.iommu_page_shift,
            "regions": regions,
        }

    def preflight(
        self, destination: Mapping[str, Any] | None, options: Mapping[str, Any]
    ) -> list[str]:
        mapped = sum(
            int(np.count_nonzero(t.view.dense() & np.uint64(TCE_PERM_MASK)))
            for t in self.iommu.qemu.tables.values()
            if t.enabled
        )
        if destination is None:
            if options.get("compat") == "preflight":
                raise MigrationRefused("spapr-tce: the destination has no sPAPR TCE support")
            return []
        if mapped and not destination.get("rebuild", False):
            raise MigrationRefused(
                f"spapr-tce: {mapped} live TCE mappings and the destination does not "
                "rebuild hardware tables (upstream QEMU blocks this migration)"
            )
        lost = _predict_cleared(self.iommu, destination)
        if lost:
            return [
                f"spapr-tce: the destination cannot back {lost} mapped TCE entries; "
                "they will be cleared (device DMA to them faults)"
            ]
        return []

    def quiesce(self) -> None:
        self.mark_dma_writable()  # devices stopped: their last DMA is in the final sync

    def save_complete(self) -> tuple[StatePiece, ...]:
        return (ComponentData(self.name, persist.encode_state(self.iommu.save())),)

    # --- destination -------------------------------------------------------------------

    def apply(self, data: bytes) -> None:
        """Decode, load the guest view and replay it into this host's hardware tables;
        a TceRestoreError fails the load (the source resumes)."""
        self.rebuild = self.iommu.restore(persist.decode_state(data))

    def post_load(self) -> dict[str, Any]:
        if self.rebuild is None:
            return {}
        return {"rebuild": _rebuild_json(self.rebuild), "invariants": _invariants(self.iommu)}

    # --- pre-copy marking (docs/models/spapr-tce.md §9.3 point 4) ------------------------------

    def mark_dma_writable(self) -> None:
        """Count every page mapped with WRITE in a window of an untracked device as dirty.
        Such a device calls this after each burst of DMA and before the guest can change
        the mappings, so a page written through an entry unmapped right after is kept."""
        if not self.ram.logging:
            return
        for liobn in sorted(self.untracked_liobns):
            table = self.iommu.window(liobn)
            if not table.enabled:
                continue
            view = table.view.dense()
            live = view[(view & np.uint64(TCE_PCI_WRITE)) != 0]
            mask = np.uint64(TCE_PERM_MASK) | np.uint64(table.page_size - 1)
            for gpa in np.unique(live & ~mask).tolist():
                if gpa + table.page_size <= self.ram.size:
                    self.ram.mark_dirty(int(gpa), table.page_size)


def _invariants(iommu: SpaprIommu) -> str:
    try:
        iommu.check_invariants()
    except Exception as exc:  # reported, not raised: a report must always render
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def _rebuild_json(report: persist.RebuildReport) -> dict[str, Any]:
    return {
        "mapped": report.mapped,
        "cleared": report.cleared,
        "windows": [
            {"liobn": w.liobn, "mapped": w.mapped, "cleared": w.cleared} for w in report.windows
        ],
    }


def _window_json(iommu: SpaprIommu, liobn: int) -> dict[str, Any]:
    t = iommu.window(liobn)
    view = t.view.dense() if t.enabled else np.zeros(0, dtype=np.uint64)
    return {
        "liobn": liobn,
        "offset": t.bus_offset,
        "page_shift": t.page_shift,
        "entries": t.nb_table,
        "mapped": int(np.count_nonzero(view & np.uint64(TCE_PERM_MASK))),
        "hw_mapped": [int(hw.mapped_entries().size) for hw in iommu.hw_tables(liobn)],
    }


def _hw_reach(iommu: SpaprIommu, hw: Any) -> npt.NDArray[np.uint64]:
    """(entry, gpa | perm) for every mapped hardware entry; hpa outside RAM -> all ones."""
    entries = hw.mapped_entries()
    tces = hw.tces.astype(np.uint64)[entries]
    hpas = tces & ~np.uint64(TCE_PERM_MASK)
    gpas = np.full(entries.size, np.uint64(0xFFFF_FFFF_FFFF_FFFF))
    for slot in iommu.host.slots:
        hit = (hpas >= np.uint64(slot.hpa)) & (hpas < np.uint64(slot.hpa + slot.size))
        gpas[hit] = hpas[hit] - np.uint64(slot.hpa) + np.uint64(slot.gpa)
    perms = tces & np.uint64(TCE_PERM_MASK)
    return np.stack([entries.astype(np.uint64) + np.uint64(hw.offset), gpas | perms]).T.copy()


def _predict_cleared(iommu: SpaprIommu, destination: Mapping[str, Any]) -> int:
    """How many mapped guest entries the destination's preregistered memory cannot back."""
    regions = destination.get("regions", [])
    max_shift = int(destination.get("iommu_page_shift", 16))
    lost = 0
    for t in iommu.qemu.tables.values():
        if not t.enabled:
            continue
        view = t.view.dense()
        live = view[(view & np.uint64(TCE_PERM_MASK)) != 0]
        shift = min(t.page_shift, max_shift)
        gpas = live & ~np.uint64(TCE_PERM_MASK) & ~np.uint64(t.page_size - 1)
        ok = np.zeros(gpas.size, dtype=np.bool_)
        for gpa, size, pageshift in regions:
            if pageshift >= shift:
                ok |= (gpas >= np.uint64(gpa)) & (
                    gpas + np.uint64(t.page_size) <= np.uint64(gpa + size)
                )
        lost += int((~ok).sum())
    return lost


# --- DMA devices ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DmaDeviceSpec:
    name: str
    liobn: int
    buffers: int = 8
    buffer_kib: int = 16
    rate_mbps: float = 4.0

    @classmethod
    def from_definition(cls, d: object) -> DmaDeviceSpec:
        if not isinstance(d, Mapping) or set(d) - _DEVICE_KEYS or not {"name", "liobn"} <= set(d):
            raise ConfigError(
                f"dma device {d!r}: keys are {sorted(_DEVICE_KEYS)} (name, liobn required)"
            )
        name = d["name"]
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"dma device name {name!r} must be an identifier")
        ints = {k: d.get(k, getattr(cls, k, 0)) for k in ("liobn", "buffers", "buffer_kib")}
        if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints.values()):
            raise ConfigError(f"dma device {name}: liobn, buffers, buffer_kib must be integers")
        rate = d.get("rate_mbps", cls.rate_mbps)
        if not isinstance(rate, int | float) or isinstance(rate, bool) or rate <= 0:
            raise ConfigError(f"dma device {name}: rate_mbps must be positive")
        if not 1 <= ints["buffers"] <= MAX_RING or not 1 <= ints["buffer_kib"] <= 1024:
            raise ConfigError(
                f"dma device {name}: buffers in [1, {MAX_RING}], buffer_kib in [1, 1024]"
            )
        return cls(name, ints["liobn"], ints["buffers"], ints["buffer_kib"], float(rate))

    @property
    def area_bytes(self) -> int:
        """Ring page, TCE list page and twice the posted buffers, in 64 KiB guest pages."""
        pool = 2 * self.buffers * -(-self.buffer_kib * 1024 // 4096) * 4096
        return _pages64(ring_bytes(self.buffers)) + PAGE_64K + _pages64(pool)


def _pages64(n: int) -> int:
    return -(-n // PAGE_64K) * PAGE_64K


class SpaprDmaHandler(BlobHandler):
    """One DMA device (registers migrate as a component) and its guest driver (state in
    guest RAM: it migrates with memory and re-attaches on the destination)."""

    def __init__(
        self,
        vm: VM,
        spec: DmaDeviceSpec,
        tce: SpaprTceHandler,
        guest_window: GuestDmaWindow,
        group: int,
        area_gpa: int,
    ) -> None:
        self.spec, self.tce = spec, tce
        tce.untracked_liobns.add(spec.liobn)
        self.name = f"spapr-dma:{spec.name}"
        tag = xxhash.xxh64_intdigest(spec.name.encode())
        self.device = SpaprDmaEngine(
            tce.iommu, liobn=spec.liobn, group=group, tag=tag, rate_mbps=spec.rate_mbps
        )
        ring_gpa = area_gpa
        list_page = ring_gpa + _pages64(ring_bytes(spec.buffers))
        self.driver = RxRingDriver(
            guest_window,
            vm.ram,
            ring_gpa=ring_gpa,
            pool_gpa=list_page + PAGE_64K,
            slots=2 * spec.buffers,
            buf_len=spec.buffer_kib * 1024,
            tag=tag,
        )
        self.driver_error = ""

    def advance(self, seconds: float) -> None:
        if self.driver_error:
            return
        try:
            if not self.driver.attached:
                if self.device.programmed:
                    self.driver.attach()  # resumed after a migration
                else:
                    self.device.program(*self.driver.probe())
            self.device.run(seconds)
            self.tce.mark_dma_writable()  # before the driver unmaps what the device wrote
            self.driver.poll()
        except (GuestDmaError, DmaDeviceError) as exc:
            self.driver_error = str(exc)

    def report(self) -> dict[str, Any]:
        dev = self.device
        out: dict[str, Any] = {
            "liobn": dev.liobn,
            "group": dev.group,
            "ring_ioba": dev.ring_ioba,
            "head": dev.head,
            "dma_count": dev.seq,
            "dma_bytes": dev.bytes,
            "faults": dev.faults,
            "halted": dev.halted,
            "driver_error": self.driver_error,
        }
        if self.driver.attached:
            st = self.driver.stats()
            out["driver"] = {"received": st.received, "corrupt": st.corrupt, "tail": st.tail}
        return out

    def save_complete(self) -> tuple[StatePiece, ...]:
        return (ComponentData(self.name, encode_state(self.device.save())),)

    def apply(self, data: bytes) -> None:
        self.device.restore(decode_state(data))

    def state_digest(self) -> str:
        return xxhash.xxh3_128_hexdigest(encode_state(self.device.save()))


class _DeviceDma:
    """Guest RAM as devices write it: the CPU's dirty log does not see DMA."""

    def __init__(self, ram: GuestRam) -> None:
        self.ram, self.size = ram, ram.size

    def read(self, gpa: int, n: int) -> bytes:
        return self.ram.read(gpa, n)

    def write(self, gpa: int, data: bytes | memoryview) -> None:
        self.ram.device_write(gpa, data)


# --- the workload stays out of the DMA area ----------------------------------------------


class _PagesBelow:
    """The guest's application memory: RAM below the kernel's DMA area."""

    def __init__(self, ram: GuestRam, npages: int) -> None:
        self.ram, self.npages, self.page_size = ram, npages, ram.page_size

    def poke_words(
        self, index: npt.NDArray[np.int64], word: int, values: npt.NDArray[np.uint64]
    ) -> None:
        self.ram.poke_words(index, word, values)


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
            device_memory=_DeviceDma(s.vm.ram),
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
                list_page=base + _pages64(ring_bytes(spec.buffers)),
                vcpu=group % len(s.vm.vcpus),
            )  # fmt: skip
        s.vm.add_handler(SpaprDmaHandler(s.vm, spec, s.tce, guest, group, base))
        base += spec.area_bytes
    vm = s.vm
    vm.workload = Workload(
        vm.definition.workload, _PagesBelow(vm.ram, s.list_page // vm.ram.page_size)
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
