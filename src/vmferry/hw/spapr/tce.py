"""sPAPR TCE entry format, DMA directions, model modes and the errors of the TCE models.

Theory of operation
-------------------
A TCE is one 64-bit value: the page address (guest real address in the guest view, host
physical address in a hardware table) ORed with two permission bits, READ (0x1: the device
may read memory) and WRITE (0x2: the device may write memory).  Both bits clear means "no
access"; the address part of such an entry is not checked by KVM, which lets userspace
store *poison* values the guest reads back with H_GET_TCE.  The H_PUT_TCE_INDIRECT list in
guest memory holds big-endian values.

The package splits the host stack into:

* :mod:`.hostmem`   -- memslots: gpa -> host userspace address (ua) -> host physical (hpa)
* :mod:`.prereg`    -- preregistered (pinned) guest memory with ``used``/``mapped`` counts
* :mod:`.hwtable`   -- hardware TCE tables, PEs and their TCE caches, the TCE kill
* :mod:`.tce_table` -- KVM's guest-view tables (stt), creation and group attachment
* :mod:`.vfio_tce`  -- the VFIO sPAPR v2 container (prereg ioctls, MAP/UNMAP_DMA)
* :mod:`.kvm_hcalls` / :mod:`.qemu_hcalls` -- the kernel and VMM hypercall handlers
* :mod:`.iommu`     -- :class:`SpaprIommu`, the facade a VM holds
* :mod:`.persist`   -- the guest view in the migration stream and the destination rebuild

Modes
-----
``correct`` is the default, and it is **vmferry's stricter variant, not any kernel's
behaviour**: no kernel copies the H_PUT_TCE_INDIRECT list once into a per-vCPU buffer, sends
no-permission entries through the unmap path, or rolls a failed entry back in every table.
It is a proposal whose safety the explorer checks.

``kernel`` is the in-kernel TCE handlers as upstream has them
(``arch/powerpc/kvm/book3s_64_vio.c``): the indirect list is validated in one pass over
guest memory, then **read again** and applied (the kernel's comment argues this is safe
because the checks that matter run again on the re-read value).  Which of those re-read
values a guest can get applied, and with what result, is the matrix in
``docs/models/spapr-tce.md`` §10.

Each other faulty mode switches on a set of :class:`Quirk` flags that reproduce one
upstream behaviour of the hazard table (``docs/models/spapr-tce.md`` §13); ``upstream``
switches on every quirk of the current kernel and QEMU together.
"""

from __future__ import annotations

from enum import Enum, IntEnum

import numpy as np
import numpy.typing as npt

from vmferry.errors import (
    HazardError,
    InvariantViolation,
    KernelError,
    ModelError,
    RefcountLeak,
)
from vmferry.hw.modes import Modes, Switch

TCE_PCI_READ = 0x1
TCE_PCI_WRITE = 0x2
TCE_PERM_MASK = TCE_PCI_READ | TCE_PCI_WRITE
TCE_SHIFT = 12
TCE_RPN_SHIFT = 12
TCE_ENTRY_SIZE = 8
TCE_RPN_MASK = 0xFFFFFFFFFF
TCE_VALID = 0x800
TCE_ALLIO = 0x400
TCE_VB_WRITE = 0x1

#: H_PUT_TCE_INDIRECT limits: one 4 KiB page of big-endian TCEs
MAX_INDIRECT = 512
TCE_LIST_ALIGN_MASK = 0xFFF

#: host page size of a POWER host (64 KiB) and the guest-view table page capacity
HOST_PAGE_SHIFT = 16
TCES_PER_PAGE = (1 << HOST_PAGE_SHIFT) // TCE_ENTRY_SIZE

KVM_MIN_PAGE_SHIFT = 12
KVM_MAX_PAGE_SHIFT = 34
U64_MASK = (1 << 64) - 1


class DmaDirection(IntEnum):
    """Linux ``enum dma_data_direction`` with its kernel values."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2
    NONE = 3


_DIRECTION_OF_BITS: dict[int, DmaDirection] = {
    0: DmaDirection.NONE,
    TCE_PCI_READ: DmaDirection.TO_DEVICE,
    TCE_PCI_WRITE: DmaDirection.FROM_DEVICE,
    TCE_PCI_READ | TCE_PCI_WRITE: DmaDirection.BIDIRECTIONAL,
}
_BITS_OF_DIRECTION: dict[DmaDirection, int] = {d: b for b, d in _DIRECTION_OF_BITS.items()}


def tce_direction(tce: int) -> DmaDirection:
    """Direction encoded in a TCE's low two bits (``iommu_tce_direction``)."""
    return _DIRECTION_OF_BITS[tce & TCE_PERM_MASK]


def direction_bits(direction: DmaDirection) -> int:
    return _BITS_OF_DIRECTION[direction]


def tce_address(tce: int) -> int:
    """The address part of a TCE (permission bits stripped)."""
    return tce & ~TCE_PERM_MASK & U64_MASK


def decode_tce_list(data: bytes) -> npt.NDArray[np.uint64]:
    """Big-endian list bytes -> native uint64 TCE values."""
    return np.frombuffer(data, dtype=">u8").astype(np.uint64)


def encode_tce_list(values: list[int] | npt.NDArray[np.uint64]) -> bytes:
    return np.asarray(values, dtype=np.uint64).astype(">u8").tobytes()


# --- modes ---------------------------------------------------------------------------------


class Quirk(Enum):
    """One upstream behaviour that vmferry's stricter ``correct`` mode does not have.

    The value names the hazard id of ``docs/models/spapr-tce.md`` §13."""

    DOUBLE_READ = "H1: indirect list read twice (validate pass, then re-read pass)"
    NO_ALIGN_RECHECK = "H2: re-read entries are not re-checked for page alignment"
    ZERO_ENTRY_MAP = "H3: no-permission list entries go through the map path"
    PARTIAL_TABLES = "H4: a failure in table k leaves tables < k updated"
    ROLLBACK_INDEX = "H5: rollback clears the first entry, unscaled by subpages"
    ROLLBACK_UNACCOUNTED = "H6/H15: rollback clear without kill and without mapped_dec"
    NO_ENTRY_LOCK = "H7: no serialisation of updates to one entry"
    IMMEDIATE_FREE = "H14: a released group's attached table is freed while handlers walk it"
    UNREGISTER_ORPHAN = "H10: unregister of a mapped region returns 0 and orphans it pinned"
    BUILD_STOP_OK = "H11: VFIO build stops with status 0 when mapped_inc fails"
    STALE_FALLBACK = "H12: VMM fallback leaves the old hardware mapping when its map fails"
    NO_REBUILD = "H13: destination hardware tables are not rebuilt after migration"
    RANGE_FIRST_PAGE = "H16: only the first page of a range is checked against the window"


#: what the current kernel's TCE hypercall handlers do (book3s_64_vio.c): validate the
#: indirect list, re-read it without re-checking alignment, map no-permission entries,
#: stop at the failing table, roll back without accounting, no per-entry lock, range
#: checked on its first page only
KERNEL_HANDLER_QUIRKS: frozenset[Quirk] = frozenset({
    Quirk.DOUBLE_READ, Quirk.NO_ALIGN_RECHECK, Quirk.ZERO_ENTRY_MAP, Quirk.PARTIAL_TABLES,
    Quirk.ROLLBACK_UNACCOUNTED, Quirk.NO_ENTRY_LOCK, Quirk.RANGE_FIRST_PAGE,
})

MODES: dict[str, frozenset[Quirk]] = {
    "correct": frozenset(),
    "double_read": frozenset({Quirk.DOUBLE_READ}),
    "no_align_recheck": frozenset({Quirk.DOUBLE_READ, Quirk.NO_ALIGN_RECHECK}),
    "zero_entry_leak": frozenset({Quirk.ZERO_ENTRY_MAP}),
    "partial_tables": frozenset({Quirk.PARTIAL_TABLES}),
    "rollback_index": frozenset({Quirk.PARTIAL_TABLES, Quirk.ROLLBACK_INDEX}),
    "rollback_unaccounted": frozenset({Quirk.PARTIAL_TABLES, Quirk.ROLLBACK_UNACCOUNTED}),
    "no_entry_lock": frozenset({Quirk.NO_ENTRY_LOCK}),
    "unregister_orphan": frozenset({Quirk.UNREGISTER_ORPHAN}),
    "immediate_free": frozenset({Quirk.IMMEDIATE_FREE}),
    "build_stop_ok": frozenset({Quirk.BUILD_STOP_OK}),
    "stale_fallback": frozenset({Quirk.STALE_FALLBACK}),
    "no_rebuild": frozenset({Quirk.NO_REBUILD}),
    "range_first_page": frozenset({Quirk.RANGE_FIRST_PAGE}),
    "upstream": frozenset(set(Quirk) - {Quirk.ROLLBACK_INDEX, Quirk.IMMEDIATE_FREE}),
    #: the KVM hypercall handlers of the current kernel, nothing from QEMU or VFIO
    "kernel": KERNEL_HANDLER_QUIRKS,
}

MODE_HELP: dict[str, str] = {
    name: "; ".join(sorted(q.value for q in quirks)) for name, quirks in MODES.items()
}
MODE_HELP["correct"] = ("vmferry's stricter variant (no kernel has it): list read once, "
                        "every hazard of the table prevented")
MODE_HELP["kernel"] = ("the kernel's own handlers: validate the list, then re-read it; "
                       + MODE_HELP["kernel"])


#: the TCE model's modes in the scheme every model uses (:mod:`vmferry.hw.modes`): one switch
#: per :class:`Quirk` (its lower-case name), the presets of :data:`MODES`
TCE_MODES = Modes(
    "TCE",
    (Switch(q.name.lower(), *reversed(q.value.split(": ", 1))) for q in Quirk),
    {name: {q.name.lower() for q in quirks} for name, quirks in MODES.items()},
    "correct",
)


def quirks_of(mode: str) -> frozenset[Quirk]:
    """The quirks of ``preset[+switch...]`` (``correct+double_read``); ConfigError if unknown."""
    return frozenset(Quirk[s.upper()] for s in TCE_MODES.parse(mode).switches)


# --- errors --------------------------------------------------------------------------------


class SpaprError(ModelError):
    """The sPAPR IOMMU model refused an operation."""


class SpaprKernelError(KernelError):
    """A KVM/VFIO TCE ioctl failed with an errno."""


class HwExchangeError(SpaprError):
    """A hardware TCE exchange failed (injected fault of the platform op)."""


class DmaFault(SpaprError):
    """A device DMA was refused by the IOMMU: unmapped IOBA or missing permission."""

    def __init__(self, liobn: int, ioba: int, write: bool, reason: str) -> None:
        self.liobn, self.ioba, self.write, self.reason = liobn, ioba, write, reason
        kind = "write" if write else "read"
        super().__init__(f"DMA {kind} liobn {liobn:#x} ioba {ioba:#x} refused: {reason}")


class TceRestoreError(SpaprError):
    """Loading or rebuilding the TCE state on the destination failed."""


class HostCrash(HazardError):
    """The host kernel would BUG(): e.g. a misaligned HPA reached the hardware exchange."""

    hazard = "host-crash"


class OutOfWindow(HazardError):
    """A handler touched a table index outside its window (range checked on page 1 only)."""

    hazard = "out-of-window"


class UnvalidatedTce(HazardError):
    """A TCE that was never validated reached a table (the re-read of the indirect list)."""

    hazard = "unvalidated-tce"


class TableDivergence(InvariantViolation):
    """A hardware table disagrees with the guest view (INV-3/INV-4)."""

    hazard = "table-divergence"


class MappedCountLeak(RefcountLeak):
    """A preregistered region's ``mapped`` count disagrees with its hardware users (INV-2)."""

    hazard = "mapped-count-leak"


class PinLeak(RefcountLeak):
    """Guest memory stays pinned although nothing can release it (INV-1/INV-7, H10)."""

    hazard = "pin-leak"


class WrongRollback(InvariantViolation):
    """A rollback cleared hardware entries other than the ones the failing entry covers."""

    hazard = "wrong-rollback"
