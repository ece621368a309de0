"""The sPAPR TCE tables of a pseries VM as a migration handler (component ``spapr-tce``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from vmferry.errors import MigrationRefused
from vmferry.hw.spapr import persist
from vmferry.hw.spapr.iommu import SpaprIommu
from vmferry.hw.spapr.tce import (
    TCE_PCI_WRITE,
    TCE_PERM_MASK,
    Quirk,
)
from vmferry.machine.handlers import BlobHandler, ComponentData, StatePiece
from vmferry.machine.pseries_platform import SpaprHostPlatform
from vmferry.machine.ram import GuestRam

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
