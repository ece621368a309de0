"""The INV rules (docs/models/spapr-tce.md §11), checked against a :class:`SpaprIommu`.

* INV-1/INV-2 (pins and counts): every hardware entry with a permission holds its UA in the
  UA cache (and only those do), points into a pinned preregistered region, and each
  region's ``mapped`` equals 1 + the hardware entries pointing into it.
* INV-3 (agreement): every hardware entry equals translate(guest view) -- hpa and
  permission (WRITE implies READ) -- or is cleared where the guest address cannot be
  translated; a mapping of memory unplugged while mapped is allowed (it stays pinned).
* INV-4 (caches): no PE's TCE cache holds a value that differs from its table.
* Quiescence: no SRCU section or table/container lock is left held.
* Hazards recorded by faulty modes (unvalidated TCEs, wrong rollbacks) are raised first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from vmferry.errors import InvariantViolation
from vmferry.hw.spapr.hwtable import HardwareTable
from vmferry.hw.spapr.prereg import PreregRegion
from vmferry.hw.spapr.qemu_hcalls import QemuTable
from vmferry.hw.spapr.tce import (
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    TCE_PERM_MASK,
    MappedCountLeak,
    TableDivergence,
)

if TYPE_CHECKING:
    from vmferry.hw.spapr.iommu import SpaprIommu

U64 = np.uint64


def check(io: SpaprIommu, *, quiescent: bool = True) -> None:
    if io.hazards:
        raise io.hazards[0]
    if quiescent:
        _check_quiescent(io)
    io.container.check_pins()
    _check_counts(io)
    _check_agreement(io)
    _check_caches(io)


def _check_quiescent(io: SpaprIommu) -> None:
    if io.kvm.srcu_depth:
        raise InvariantViolation(f"SRCU read section left held ({io.kvm.srcu_depth})")
    for stt in io.kvm_tables.tables.values():
        if stt.lock.locked:
            raise InvariantViolation(f"{stt.lock} left held")
    if io.container.lock.locked:
        raise InvariantViolation("container lock left held")


def _all_tables(io: SpaprIommu) -> list[HardwareTable]:
    seen: dict[int, HardwareTable] = {}
    for tables in io.container.windows.values():
        for table in tables:
            seen[id(table)] = table
    return list(seen.values())


def _regions(io: SpaprIommu) -> list[PreregRegion]:
    return [*io.mm.regions, *(r for r in io.container.orphans if r not in io.mm.regions)]


def _check_counts(io: SpaprIommu) -> None:
    """INV-1/INV-2: mapped = 1 + hardware entries with permission into the region."""
    users: dict[int, int] = {}
    regions = _regions(io)
    for table in _all_tables(io):
        perm = (table.tces.astype(U64) & U64(TCE_PERM_MASK)) != 0
        uas = table.ua_cache.astype(U64)
        if (perm & (uas == 0)).any() or (~perm & (uas != 0)).any():
            bad = int(np.nonzero(perm ^ (uas != 0))[0][0]) + table.offset
            raise MappedCountLeak(
                f"table {table.name} entry {bad:#x}: UA cache and permission disagree"
            )
        live = uas[perm]
        found = np.zeros(len(live), dtype=np.bool_)
        for region in regions:
            hit = (live >= U64(region.ua)) & (live < U64(region.end))
            users[id(region)] = users.get(id(region), 0) + int(hit.sum())
            found |= hit
        if not found.all():
            raise MappedCountLeak(f"table {table.name}: a mapping points into no region")
    for region in regions:
        if not region.pinned and users.get(id(region), 0):
            raise MappedCountLeak(f"region {region.ua:#x} unpinned while mapped")
        if region.mapped != 0 and region.mapped != 1 + users.get(id(region), 0):
            raise MappedCountLeak(
                f"region {region.ua:#x}: mapped {region.mapped}, "
                f"{users.get(id(region), 0)} hardware users"
            )


def expected_hw(io: SpaprIommu, table: QemuTable, hw: HardwareTable) -> npt.NDArray[np.uint64]:
    """translate(guest view) for ``hw``: hpa|perm, or 0 where untranslatable."""
    view = table.view.dense()
    sub = 1 << (table.page_shift - hw.page_shift)
    perms = view & U64(TCE_PERM_MASK)
    gpas = view & ~U64(TCE_PERM_MASK) & ~U64(table.page_size - 1)
    steps = np.arange(sub, dtype=U64) << U64(hw.page_shift)
    gpa_sub = (gpas[:, None] + steps[None, :]).ravel()
    perm_sub = np.repeat(perms, sub)
    expected = np.zeros(len(gpa_sub), dtype=U64)
    for idx in np.nonzero(perm_sub)[0]:
        hpa = translate_gpa(io, int(gpa_sub[idx]), hw)
        if hpa is not None:
            bits = int(perm_sub[idx])
            expected[idx] = hpa | bits | (TCE_PCI_READ if bits & TCE_PCI_WRITE else 0)
    return expected


def translate_gpa(io: SpaprIommu, gpa: int, hw: HardwareTable) -> int | None:
    ua = io.host.gpa_to_ua(gpa)
    if ua is None or io.host.gpa_to_ua(gpa + hw.page_size - 1) is None:
        return None
    region = io.mm.lookup(ua, hw.page_size)
    if region is None or region.pageshift < hw.page_shift:
        return None
    return region.ua_to_hpa(ua, hw.page_shift)


def _check_agreement(io: SpaprIommu) -> None:
    """INV-3: every hardware entry equals translate(guest view) or is cleared."""
    for liobn, tables in io.container.windows.items():
        qt = io.qemu.tables[liobn]
        for hw in tables:
            expected = expected_hw(io, qt, hw)
            first = (qt.bus_offset >> hw.page_shift) - hw.offset
            actual = hw.tces[first : first + len(expected)].astype(U64)
            bad = np.nonzero(actual != expected)[0]
            for idx in bad:
                if _stale_after_unplug(io, qt, hw, int(idx), int(actual[idx])):
                    continue
                raise TableDivergence(
                    f"liobn {liobn:#x} table {hw.name} hw entry {int(idx) + hw.offset:#x}: "
                    f"holds {int(actual[idx]):#x}, guest view says {int(expected[idx]):#x}"
                )


def _stale_after_unplug(
    io: SpaprIommu, qt: QemuTable, hw: HardwareTable, idx: int, value: int
) -> bool:
    """A mapping of the guest view's own gpa whose memslot was unplugged (INV-1 holds)."""
    sub = 1 << (qt.page_shift - hw.page_shift)
    tce = qt.view.get(idx // sub)
    gpa = (tce & ~TCE_PERM_MASK & ~(qt.page_size - 1)) + ((idx % sub) << hw.page_shift)
    gone = [s for s in io.host.backing if s.has_gpa(gpa) and s not in io.host.slots]
    if not gone or not value & TCE_PERM_MASK:
        return False
    region = io.mm.lookup(hw.ua(idx + hw.offset), hw.page_size)
    want = gone[0].hpa + (gpa - gone[0].gpa)
    return region is not None and region.pinned and value & ~TCE_PERM_MASK == want


def _check_caches(io: SpaprIommu) -> None:
    """INV-4: no PE cache holds a translation that differs from its table."""
    by_name = {t.name: t for t in _all_tables(io)}
    for group in io.groups:
        for (name, entry), value in group.pe.cache.items():
            table = by_name.get(name)
            if table is not None and table.read(entry) != value:
                raise TableDivergence(
                    f"PE {group.pe.number} caches {value:#x} for {name} entry {entry:#x}, "
                    f"table holds {table.read(entry):#x}"
                )
