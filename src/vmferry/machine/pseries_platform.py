"""The pseries host platform: where this host keeps a guest's RAM (``[spapr]`` table)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import xxhash

from vmferry.errors import ConfigError
from vmferry.hw.spapr.hostmem import DEFAULT_HPA_BASE, HostMemoryMap, Memslot
from vmferry.hw.spapr.tce import (
    SpaprError,
    quirks_of,
)
from vmferry.machine.vm import HostContext

MIB: Final = 1 << 20
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
