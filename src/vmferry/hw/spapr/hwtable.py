"""Hardware TCE tables (``struct iommu_table``), PEs with TCE caches, and the TCE kill.

Theory of operation
-------------------
A hardware table holds host physical addresses with permission bits, stored big-endian
like the real table, plus a parallel big-endian *UA cache* of the userspace address mapped
in each entry (used to find the preregistered region on unmap).  Entries are changed with
:meth:`HardwareTable.xchg_no_kill`, which returns the previous address and direction and,
like PowerNV, sets READ whenever WRITE is set and asserts that the address is aligned to
the table's page (a misaligned address is a host BUG: :class:`HostCrash`).  Changing an
entry does not invalidate the PEs' TCE caches: a device may keep using a stale translation
until :meth:`HardwareTable.kill` covers the entry on every PE linked to the table.

``offset`` is the table's first entry number (bus offset >> page shift); callers index with
absolute entry numbers, exactly as the kernel's ``it_offset`` works.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from vmferry.hw.spapr.tce import (
    TCE_PCI_READ,
    TCE_PCI_WRITE,
    TCE_PERM_MASK,
    DmaDirection,
    HostCrash,
    HwExchangeError,
    OutOfWindow,
    direction_bits,
    tce_direction,
)
from vmferry.sync import yield_point


@dataclass(eq=False)
class Pe:
    """A partitionable endpoint: the unit whose TCE cache a kill invalidates."""

    number: int
    #: (table name, absolute entry) -> cached hardware TCE
    cache: dict[tuple[str, int], int] = field(default_factory=dict)
    kills: int = 0

    def invalidate(self, table: str, first: int, count: int) -> None:
        self.kills += 1
        for key in [k for k in self.cache if k[0] == table and first <= k[1] < first + count]:
            del self.cache[key]


class HardwareTable:
    """One host IOMMU table.  Invariant: ``tces[i]`` is aligned to the page unless NONE."""

    def __init__(self, name: str, page_shift: int, bus_offset: int, entries: int) -> None:
        self.name = name
        self.page_shift = page_shift
        self.bus_offset = bus_offset
        self.offset = bus_offset >> page_shift
        self.size = entries
        self.tces: npt.NDArray[np.uint64] = np.zeros(entries, dtype=">u8")
        self.ua_cache: npt.NDArray[np.uint64] = np.zeros(entries, dtype=">u8")
        self.pes: list[Pe] = []
        #: entries whose next exchange fails, once each (fault injection for the platform op)
        self.fail_xchg: set[int] = set()
        self.kill_log: list[tuple[int, int]] = []
        self.exchanges = 0

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def window_bytes(self) -> int:
        return self.size << self.page_shift

    def _slot(self, entry: int) -> int:
        index = entry - self.offset
        if not 0 <= index < self.size:
            raise OutOfWindow(
                f"table {self.name}: entry {entry:#x} outside [{self.offset:#x}, "
                f"{self.offset + self.size:#x})"
            )
        return index

    def read(self, entry: int) -> int:
        return int(self.tces[self._slot(entry)])

    def ua(self, entry: int) -> int:
        return int(self.ua_cache[self._slot(entry)])

    def set_ua(self, entry: int, ua: int) -> None:
        self.ua_cache[self._slot(entry)] = ua

    def xchg_no_kill(
        self, entry: int, hpa: int, direction: DmaDirection
    ) -> tuple[int, DmaDirection]:
        """Store (hpa, direction) at ``entry``; return the old (hpa, direction)."""
        index = self._slot(entry)
        yield_point(f"hw {self.name} xchg {entry:#x}", (self.name, entry), write=True)
        if entry in self.fail_xchg:
            self.fail_xchg.discard(entry)
            raise HwExchangeError(f"table {self.name}: exchange of entry {entry:#x} failed")
        if hpa & (self.page_size - 1):
            raise HostCrash(
                f"table {self.name}: hpa {hpa:#x} not aligned to {self.page_size:#x} "
                f"at entry {entry:#x} (BUG_ON in the exchange)"
            )
        bits = direction_bits(direction)
        if bits & TCE_PCI_WRITE:
            bits |= TCE_PCI_READ
        old = int(self.tces[index])
        self.tces[index] = hpa | bits
        self.exchanges += 1
        return old & ~TCE_PERM_MASK, tce_direction(old)

    def kill(self, first: int, count: int) -> None:
        """Invalidate ``count`` entries from ``first`` in every linked PE's TCE cache."""
        yield_point(f"hw {self.name} kill {first:#x}+{count}", (self.name, "kill"), write=True)
        self.kill_log.append((first, count))
        for pe in self.pes:
            pe.invalidate(self.name, first, count)

    def dma_lookup(self, pe: Pe, entry: int) -> int:
        """The TCE a device behind ``pe`` uses for ``entry`` (through the PE's cache)."""
        key = (self.name, entry)
        if key not in pe.cache:
            pe.cache[key] = self.read(entry)
        return pe.cache[key]

    def mapped_entries(self) -> npt.NDArray[np.intp]:
        return np.nonzero(self.tces.astype(np.uint64) & np.uint64(TCE_PERM_MASK))[0]


@dataclass(eq=False)
class IommuGroup:
    """An IOMMU group (one PE on PowerNV) and the hardware table it uses per window."""

    number: int
    pe: Pe
    #: liobn -> hardware table programmed into this group for that window
    tables: dict[int, HardwareTable] = field(default_factory=dict)
    released: bool = False
