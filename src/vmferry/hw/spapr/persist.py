"""The guest TCE view across migration: save, encode/decode, restore and rebuild.

What travels is the *guest view* of every window (LIOBN, bus offset, page shift, number of
entries, raw TCE values including poison values), as QEMU's ``spapr_iommu`` section does.
Host addresses never travel: the destination rebuilds its hardware tables from the guest
view with its own gpa -> hpa map (docs/models/spapr-tce.md §9.3) -- upstream QEMU does not,
and blocks such migrations. Entries the destination cannot translate (guest address outside
its RAM, not preregistered, or too small a backing page) are cleared in hardware and counted
in the :class:`RebuildReport`; any other failure to map fails the load.

Wire format (all big-endian)::

    +------+---------+-----------+
    | STCE | ver u16 | nwin u16  |   header, 8 bytes
    +------+---------+-----------+
    per window:
    | liobn u32 | bus_offset u64 | page_shift u32 | nb_table u32 | nnz u32 |   24 bytes
    | nnz x index u32 (strictly increasing, < nb_table) | nnz x value u64 |

Only non-zero entries are sent; a disabled window has ``nb_table`` 0.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from vmferry.errors import (
    KernelError,
    MalformedRecord,
    TruncatedRecord,
)
from vmferry.hw.persist import Field, Layout
from vmferry.hw.spapr.hwtable import HardwareTable
from vmferry.hw.spapr.qemu_hcalls import QemuTable
from vmferry.hw.spapr.tce import (
    KVM_MAX_PAGE_SHIFT,
    KVM_MIN_PAGE_SHIFT,
    TCE_PERM_MASK,
    Quirk,
    TceRestoreError,
    tce_direction,
)
from vmferry.hw.spapr.windows import WindowSpec

if TYPE_CHECKING:
    from vmferry.hw.spapr.iommu import SpaprIommu

MAGIC = b"STCE"
VERSION = 1
#: ``"STCE" | u16 version | u16 windows``, then the windows (:mod:`vmferry.hw.persist`)
HEADER = Layout("spapr tce", MAGIC, VERSION, (Field("windows", "u16"),))
_WINDOW = struct.Struct(">IQIII")
MAX_ENTRIES = 1 << 28
U64 = np.uint64


@dataclass(frozen=True)
class WindowState:
    liobn: int
    bus_offset: int
    page_shift: int
    nb_table: int
    #: raw guest-view values as big-endian u64, nb_table x 8 bytes
    entries: bytes

    def values(self) -> np.ndarray[tuple[int], np.dtype[np.uint64]]:
        return np.frombuffer(self.entries, dtype=">u8").astype(np.uint64)


@dataclass(frozen=True)
class SpaprTceState:
    windows: tuple[WindowState, ...]


@dataclass(frozen=True)
class WindowRebuild:
    liobn: int
    mapped: int  # guest entries mapped into hardware
    cleared: int  # guest entries with permission the destination could not translate


@dataclass(frozen=True)
class RebuildReport:
    windows: tuple[WindowRebuild, ...]

    @property
    def cleared(self) -> int:
        return sum(w.cleared for w in self.windows)

    @property
    def mapped(self) -> int:
        return sum(w.mapped for w in self.windows)


# --- save / encode / decode ----------------------------------------------------------------


def save(iommu: SpaprIommu) -> SpaprTceState:
    """The guest view of every window (cannot fail)."""
    out = []
    for liobn in sorted(iommu.qemu.tables):
        t = iommu.qemu.tables[liobn]
        data = t.view.dense().astype(">u8").tobytes() if t.enabled else b""
        out.append(WindowState(liobn, t.bus_offset, t.page_shift, t.nb_table, data))
    return SpaprTceState(tuple(out))


def encode_state(state: SpaprTceState) -> bytes:
    parts = [HEADER.encode({"windows": len(state.windows)})]
    for w in state.windows:
        values = w.values()
        idx = np.nonzero(values)[0]
        parts.append(_WINDOW.pack(w.liobn, w.bus_offset, w.page_shift, w.nb_table, len(idx)))
        parts.append(idx.astype(">u4").tobytes())
        parts.append(values[idx].astype(">u8").tobytes())
    return b"".join(parts)


def decode_state(data: bytes) -> SpaprTceState:
    """Strict decode: every malformation is a StreamDecodeError subclass."""
    head, pos = HEADER.decode_head(data)
    nwin = head["windows"]
    windows: list[WindowState] = []
    seen: set[int] = set()
    for _ in range(nwin):
        window, pos = _decode_window(data, pos)
        if window.liobn in seen:
            raise MalformedRecord(f"spapr tce state: liobn {window.liobn:#x} twice", pos)
        seen.add(window.liobn)
        windows.append(window)
    if pos != len(data):
        raise MalformedRecord(f"spapr tce state: {len(data) - pos} trailing bytes", pos)
    return SpaprTceState(tuple(windows))


def _decode_window(data: bytes, pos: int) -> tuple[WindowState, int]:
    if len(data) - pos < _WINDOW.size:
        raise TruncatedRecord("spapr tce window header truncated", pos)
    liobn, bus_offset, shift, nb_table, nnz = _WINDOW.unpack_from(data, pos)
    pos += _WINDOW.size
    if nb_table and not KVM_MIN_PAGE_SHIFT <= shift <= KVM_MAX_PAGE_SHIFT:
        raise MalformedRecord(f"liobn {liobn:#x}: page shift {shift}", pos)
    if nb_table > MAX_ENTRIES or nnz > nb_table or bus_offset & ((1 << shift) - 1):
        raise MalformedRecord(f"liobn {liobn:#x}: {nnz} of {nb_table} entries", pos)
    end = pos + nnz * 12
    if len(data) < end:
        raise TruncatedRecord(f"liobn {liobn:#x}: entries truncated", pos)
    idx = np.frombuffer(data, dtype=">u4", count=nnz, offset=pos).astype(np.int64)
    vals = np.frombuffer(data, dtype=">u8", count=nnz, offset=pos + 4 * nnz).astype(np.uint64)
    if nnz and (idx[-1] >= nb_table or (np.diff(idx) <= 0).any() or not vals.all()):
        raise MalformedRecord(f"liobn {liobn:#x}: bad entry index list", pos)
    dense = np.zeros(nb_table, dtype=np.uint64)
    dense[idx] = vals
    state = WindowState(liobn, bus_offset, shift, nb_table, dense.astype(">u8").tobytes())
    return state, end


# --- restore and rebuild -------------------------------------------------------------------


def restore(iommu: SpaprIommu, state: SpaprTceState) -> RebuildReport:
    """post_load for every window, then the explicit replay into hardware (docs/models/spapr-tce.md
    §9.3).

    Raises TceRestoreError for a LIOBN the destination does not have or a replay failure.
    """
    for w in state.windows:
        if w.liobn not in iommu.qemu.tables:
            raise TceRestoreError(f"stream carries liobn {w.liobn:#x}, destination has none")
    reports = []
    for w in state.windows:
        table = _post_load(iommu, w)
        if table.enabled and Quirk.NO_REBUILD not in iommu.quirks:
            reports.append(rebuild_window(iommu, w.liobn))
    return RebuildReport(tuple(reports))


def _post_load(iommu: SpaprIommu, w: WindowState) -> QemuTable:
    table = iommu.qemu.tables[w.liobn]
    if table.liobn != w.liobn:
        raise TceRestoreError(f"liobn mismatch {table.liobn:#x} != {w.liobn:#x}")
    same = (table.nb_table, table.bus_offset, table.page_shift) == (
        w.nb_table,
        w.bus_offset,
        w.page_shift,
    )
    if table.enabled and not same:
        iommu.remove_window(w.liobn)
    if w.nb_table == 0:
        return iommu.qemu.tables[w.liobn]
    if not iommu.qemu.tables[w.liobn].enabled:
        in_kernel = table.kvm is not None or not table.enabled
        spec = WindowSpec(
            w.liobn, w.bus_offset, w.nb_table << w.page_shift, w.page_shift, in_kernel
        )
        iommu.add_window(spec)
    table = iommu.qemu.tables[w.liobn]
    table.view.load(w.values())
    return table


def rebuild_window(iommu: SpaprIommu, liobn: int) -> WindowRebuild:
    """Make every hardware table of ``liobn`` equal translate(guest view) (INV-8)."""
    table = iommu.qemu.tables[liobn]
    hw_tables = iommu.hw_tables(liobn)
    fast = _rebuild_bulk(iommu, table, hw_tables)
    if fast is not None:
        return fast
    for hw in hw_tables:  # drop whatever the destination held before the replay
        for stale in np.nonzero(hw.tces.astype(np.uint64))[0]:
            iommu.ops.clear_accounted(hw, hw.offset + int(stale), 1)
    mapped = cleared = 0
    if not hw_tables:
        return WindowRebuild(liobn, 0, 0)
    for index in table.view.nonzero():
        tce = table.view.get(index)
        if not tce & TCE_PERM_MASK:
            continue
        gpa = tce & ~TCE_PERM_MASK & ~(table.page_size - 1)
        ua = _translatable(iommu, gpa, table)
        if ua is None:
            cleared += 1
            continue
        iova = table.bus_offset + (index << table.page_shift)
        try:
            iommu.container.map_dma(liobn, iova, ua, table.page_size, tce_direction(tce))
        except KernelError as exc:
            raise TceRestoreError(
                f"liobn {liobn:#x} entry {index:#x}: replay failed: {exc}"
            ) from exc
        mapped += 1
    return WindowRebuild(liobn, mapped, cleared)


def _rebuild_bulk(
    iommu: SpaprIommu, table: QemuTable, hw_tables: list[HardwareTable]
) -> WindowRebuild | None:
    """The replay as array operations (downtime matters): per hardware table one plan over
    the whole window, committed only when every table's plan holds.  None: the per-entry
    replay runs instead (a faulty mode, a region being released, an injected failure)."""
    if not hw_tables or iommu.quirks or not iommu.kvm.vectorised:
        return None
    if any(region.mapped == 0 for region in iommu.mm.regions):
        return None
    view = table.view.dense()
    perms = view & U64(TCE_PERM_MASK)
    live = perms != 0
    gpas = view & ~U64(TCE_PERM_MASK) & ~U64(table.page_size - 1)
    uas = np.zeros(len(view), dtype=U64)
    ok = np.zeros(len(view), dtype=np.bool_)
    for slot in iommu.host.slots:  # the whole IOMMU page inside one memslot
        hit = (
            live
            & (gpas >= U64(slot.gpa))
            & (gpas + U64(table.page_size) <= U64(slot.gpa + slot.size))
        )
        uas[hit] = gpas[hit] - U64(slot.gpa) + U64(slot.ua)
        ok |= hit
    for hw in hw_tables:  # ... and backed by preregistered pages at least this large
        size = U64(max(hw.page_size, table.page_size))
        covered = np.zeros(len(view), dtype=np.bool_)
        for region in iommu.mm.regions:
            if region.pageshift >= hw.page_shift:
                covered |= (uas >= U64(region.ua)) & (uas + size <= U64(region.end))
        ok &= covered
    keep = np.where(ok, perms, U64(0)).astype(U64)
    first = table.bus_offset >> table.page_shift
    plans = []
    for hw in hw_tables:
        plan = iommu.kvm.bulk.plan_table(
            table.page_shift, hw, first, np.where(ok, uas, U64(0)), keep
        )
        if plan is None:
            return None
        plans.append(plan)
    for plan in plans:
        iommu.kvm.bulk.commit_plan(plan)
    return WindowRebuild(table.liobn, int(ok.sum()), int((live & ~ok).sum()))


def _translatable(iommu: SpaprIommu, gpa: int, table: QemuTable) -> int | None:
    for hw in iommu.hw_tables(table.liobn):
        sub = 1 << (table.page_shift - hw.page_shift)
        for k in range(sub):
            if iommu.translate_gpa(gpa + (k << hw.page_shift), hw) is None:
                return None
    return iommu.host.gpa_to_ua(gpa)


def needs_ex_subsection(w: WindowState) -> bool:
    """QEMU sends its "spapr_iommu_ex" subsection only for a non-default window."""
    return w.bus_offset != 0 or w.page_shift != 12
